"""Fixtures for the checkpoint tests: real megatron-core in this process (world size 1, gloo),
and a tiny tmpfs for real disk-full and read-only faults."""

from __future__ import annotations

import gc
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _frozen_heap():
    """Freeze the objects alive before each test out of the cyclic GC's way, for speed.

    megatron's ``DistributedOptimizer.sharded_state_dict`` runs ``gc.collect()`` on every save
    (distrib_optimizer.py:1283); under pytest, with torch, megatron and the other tests' objects
    alive, each full collection takes about 0.5 s. Objects created by the test stay collectable.
    """
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size_kib) -> Path``: a fresh tmpfs of that size (skips the test without the
    privileges to mount); ``remount_ro(path)`` makes it read-only. Unmounted afterwards."""
    mounted: list[Path] = []

    class Mounts:
        def mount(self, size_kib: int) -> Path:
            path = tmp_path / f"tmpfs{len(mounted)}"
            path.mkdir()
            try:
                proc = subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                    capture_output=True,
                    text=True,
                )
                why = proc.stderr.strip() if proc.returncode != 0 else None
            except OSError as e:
                why = str(e)
            if why is not None:
                pytest.skip(f"cannot mount a tmpfs here (needs root): {why}")
            mounted.append(path)
            return path

        def remount_ro(self, path: Path) -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    try:
        yield Mounts()
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
