"""Fixtures for the conversion tests: tiny HF checkpoints per family, converted once per session,
and the megatron side to run them (one process, gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from convert_fixtures import HF_CONFIGS, build_hf_model, hf_logits, tokens


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (saved HF dir, its float32 logits); built once per session."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in HF_CONFIGS:
        model = build_hf_model(family)
        path = root / family
        model.save_pretrained(path)
        out[family] = (path, hf_logits(model))
    return out


@pytest.fixture(scope="session")
def converted(hf_checkpoints, tmp_path_factory):
    """family -> megatron dir converted from the HF checkpoint (EP=2 recorded), once per session."""
    from vp2o.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("mcore")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = hf_to_mcore(
                hf_checkpoints[family][0], root / family, expert_parallel=2
            ).out
        return cache[family]

    return get


@pytest.fixture
def megatron_logits():
    """Build the model from a converted dir (one process), load it, return logits on tokens()."""
    from vp2o.config import load_config
    from vp2o.convert import load_model_weights
    from vp2o.mcore import model as mdl
    from vp2o.mcore import parallel

    def run(mcore_dir: Path) -> torch.Tensor:
        cfg = load_config(mcore_dir / "config.yaml", ["parallel.expert_parallel=1"])
        parallel.initialize(cfg)
        try:
            model = mdl.build_model(cfg)
            load_model_weights(model, mcore_dir)
            model.eval()
            t = tokens()
            pos = torch.arange(t.shape[1]).unsqueeze(0).expand_as(t)
            with torch.no_grad():
                return model(t, pos, None)[..., : cfg.model.vocab_size].float()  # [B, S, V]
        finally:
            parallel.destroy()

    return run
