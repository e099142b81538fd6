"""Shared pytest set-up: quiet megatron's import-time warnings about missing apex/TE; the
``init_parallel`` fixture (real megatron-core in this process: world size 1, gloo) and the
``private_tmp`` fixture (a temporary folder of the test's own, for process-leak checks)."""

import os
import shutil
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist

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


@pytest.fixture(autouse=True, scope="session")
def _one_process_group_per_worker():
    """Keep a single-process world's process groups for the whole test session.

    Hundreds of in-process tests initialise and destroy a one-process world; each round makes
    megatron's ~20 process groups (a gloo group: a polling thread and two work threads) and costs
    ~0.3 s here. In one process every layout is TP = PP = EP = 1, so ``parallel.initialize`` can
    take the groups already there (it re-seeds megatron's generators all the same);
    ``parallel.destroy`` therefore keeps a one-process world here and tears everything down at
    the end of the session. Suite times with and without it: docs/benchmarks.md. The real
    teardown is tested in fresh processes (``tests/mcore/test_model.py``,
    ``tests/e2e/test_train.py``); multi-process jobs (torchrun) are separate processes too."""
    from vp2o.mcore import parallel

    tear_down = parallel.destroy

    def keep_one_process_world() -> None:
        if dist.is_initialized() and dist.get_world_size() == 1:
            return
        tear_down()

    parallel.destroy = keep_one_process_world
    yield
    parallel.destroy = tear_down
    tear_down()


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
