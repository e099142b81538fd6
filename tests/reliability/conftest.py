"""Fixtures of the reliability tests."""

from __future__ import annotations

import gc
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _frozen_heap():
    """megatron's distributed optimizer runs gc.collect() per save; keep pytest's heap out of it
    (as tests/checkpoint/conftest.py does)."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def destroy_parallel():
    """Tear down torch.distributed after an in-process run that failed before its own clean-up
    (``vp2o.train.train`` opens the session outside its try/finally)."""
    yield
    from vp2o.mcore import parallel

    parallel.destroy()


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(path, size_kib)`` mounts a tmpfs there (skips without the privilege); unmounted
    afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, size_kib: int = 65536) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                               str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
