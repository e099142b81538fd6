"""Shared pytest set-up: quiet megatron's import-time warnings about missing apex/TE, and the
``init_parallel`` fixture (real megatron-core in this process: world size 1, gloo)."""

import warnings

import pytest
import torch

from vp2o.config import Config, load_config

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*apex.*")


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
