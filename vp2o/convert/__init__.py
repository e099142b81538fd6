"""Checkpoint conversion between Hugging Face and megatron-core for MoE models.

    from vp2o.convert import hf_to_mcore, mcore_to_hf
    hf_to_mcore("/models/Qwen3-30B-A3B", "/ckpt/qwen3-30b", expert_parallel=8)
    mcore_to_hf("/ckpt/qwen3-30b", "/models/qwen3-30b-rl")

Families: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE (its full-width q/k norm needs TP = 1;
docs/convert.md).
Tensors stream one parameter at a time in both directions. Needs the ``[hf]`` extra.

Names are imported on first use, so ``vp2o.convert.cli`` (and ``vp2o --help``) does not import
torch or megatron-core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConvertError": "vp2o.convert.tensors",
    "ConvertResult": "vp2o.convert.convert",
    "hf_to_mcore": "vp2o.convert.convert",
    "mcore_to_hf": "vp2o.convert.convert",
    "FAMILIES": "vp2o.convert.families",
    "Family": "vp2o.convert.families",
    "family_for": "vp2o.convert.families",
    "get_family": "vp2o.convert.families",
    "load_model_weights": "vp2o.convert.mcore_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vp2o.convert' has no attribute {name!r}")
