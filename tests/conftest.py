"""Shared pytest set-up: quiet megatron's import-time warnings about missing apex/TE; the
``init_parallel`` fixture (real megatron-core in this process: world size 1, gloo) and the
``private_tmp`` fixture (a temporary folder of the test's own, for process-leak checks)."""

import os
import shutil
import tempfile
import warnings

import pytest
import torch

from vp2o.config import Config, load_config

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*apex.*")



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
