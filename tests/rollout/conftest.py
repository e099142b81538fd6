"""Fixtures for the rollout tests: real megatron-core in this process (world size 1, gloo).

``init_parallel`` comes from tests/conftest.py. ``tiny`` builds one small VP2O MoE model per test
module, which keeps the folder fast: every test in a module samples from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from rollout_fixtures import TINY, char_tokenizer

from vp2o.config import Config, load_config
from vp2o.data.tokenizer import CharTokenizer


@dataclass
class Tiny:
    """A built model with its config and a tokenizer covering its vocabulary."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: CharTokenizer


@pytest.fixture(scope="module")
def tiny():
    """The tiny VP2O MoE (2 layers, d=64, 8 experts, top-2), built once per module."""
    from vp2o.mcore import model as mdl
    from vp2o.mcore import parallel, vp2o_moe

    cfg = load_config(None, TINY)
    parallel.initialize(cfg, seed=1234)
    torch.manual_seed(0)
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    yield Tiny(cfg, model, char_tokenizer(cfg.model.vocab_size))
    parallel.destroy()
    torch.manual_seed(0)
