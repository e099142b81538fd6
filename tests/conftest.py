"""Shared pytest set-up: quiet megatron's import-time warnings about missing apex/TE, the
``init_parallel`` fixture (real megatron-core in this process: world size 1, gloo), and the
order in which ``make test``'s workers take test files."""

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from vp2o.config import Config, load_config

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*apex.*")

# The files that take longest (serial durations on the 2-core VM, 2026-12-07: ~90 s, ~90 s,
# ~70 s, ~50 s, ~50 s), collected first: `make test` runs two pytest-xdist workers that each
# take whole files in collection order (--dist loadfile), and a long file taken last would run
# alone at the end. A stale list costs only time.
SLOW_FILES_FIRST = (
    "e2e/test_scaleout.py",
    "e2e/test_train_vllm.py",
    "mcore/test_vp2o_distributed.py",
    "e2e/test_train.py",
    "reliability/test_trainer_signals.py",
    "e2e/test_eval.py",
    "test_study.py",
    "mcore/test_distributed.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Move the tests of ``SLOW_FILES_FIRST`` to the front (stable: each file's own order and
    every other file's are kept)."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    tests_dir = Path(__file__).parent

    def key(item):
        try:
            rel = Path(str(item.path)).relative_to(tests_dir).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(rel, len(rank))

    items.sort(key=key)


@pytest.fixture
def private_tmp(monkeypatch):
    """A fresh temporary folder as this test's default (``TMPDIR`` and tempfile's cached
    default; processes the test starts inherit it). The sandbox's job folders, hence its
    processes' command lines, then name it: ``live_pids(private_tmp)`` sees this test's
    sandboxes only, not those of a test running beside it in make test's other worker. Inside
    bubblewrap the job's processes share a pid namespace that dies with bwrap, whose command
    line names the folder."""
    folder = tempfile.mkdtemp(prefix="vp2o-test-")
    os.chmod(folder, 0o1777)  # like /tmp: sandboxes may run under uids of their own
    monkeypatch.setenv("TMPDIR", folder)
    monkeypatch.setattr(tempfile, "tempdir", folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def init_parallel():
    """Initialise torch.distributed + megatron for a config; torn down after the test.

    Usage: ``groups = init_parallel(cfg)``.
    """
    from vp2o.mcore import parallel

    def _init(cfg: Config | None = None, seed: int = 1234):
        cfg = cfg or load_config(None)
        return parallel.initialize(cfg, seed=seed)

    yield _init
    parallel.destroy()
    torch.manual_seed(0)
