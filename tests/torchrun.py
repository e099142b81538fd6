"""How the tests start processes: torchrun on loopback (gloo), one thread each, quiet.

``launcher(nproc)`` is the command prefix (plain ``python`` for 0), to which the caller appends a
script path or ``-m module`` and its arguments; ``worker_env()`` the environment for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Left behind by a live process group in this (pytest) process; a child torchrun sets its own.
_RENDEZVOUS = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
TESTS = Path(__file__).resolve().parent  # on the workers' path: they import the test helpers


def launcher(nproc: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N`` (N >= 1): the
    rendezvous binds port 0 on loopback, so the kernel picks a free port as it binds (no window
    between finding a port and taking it, where the other test worker's job could take it)."""
    if nproc == 0:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]


def worker_env(**extra: str) -> dict[str, str]:
    """This environment without rendezvous variables, one intra-op thread, no warnings, and
    ``tests/`` on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    path = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path, **extra)
    return env
