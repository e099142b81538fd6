"""The learner's weights as an inference engine reads them: HF config and HF-named tensors.

:func:`engine_family` picks the registered family (``vp2o.convert.families``) that expresses a
``model:`` config exactly; :func:`write_engine_model_dir` writes the ``config.json`` (no weights:
the engine starts from dummy weights and the first sync loads the real ones);
:func:`hf_named_tensors` streams the model's parameters under their HF names through the
converter's own rules and layouts (one megatron parameter converted at a time, so at most one
parameter's HF copy exists beyond the model itself).

The stream covers tensor = pipeline = expert parallel size 1 (every rank holds the whole model;
data parallelism is fine); other layouts are refused naming the setting.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from vp2o.config import ModelConfig
from vp2o.convert import families as fam
from vp2o.convert.tensors import ConvertError, get_layout


def engine_family(m: ModelConfig, name: str | None = None) -> fam.Family:
    """The family to express ``m`` as: ``name`` when given, else the first registered family
    whose HF config reads back as ``m``.

    Raises:
        ConvertError: no registered family expresses ``m`` (the message names the fields).
    """
    if name is not None:
        family = fam.get_family(name)
        family.hf_config(m)  # raises naming the field it cannot express
        return family
    reasons = []
    for family in fam.FAMILIES.values():
        try:
            family.hf_config(m)
        except ConvertError as e:
            reasons.append(f"{family.name}: {e}")
            continue
        return family
    raise ConvertError(
        "rollout.engine=vllm: no supported model family (" + ", ".join(fam.FAMILIES.names())
        + ") expresses this model: " + "; ".join(reasons) + "; use rollout.engine=megatron"
    )


def write_engine_model_dir(m: ModelConfig, out_dir: str | os.PathLike, *,
                           family: fam.Family | None = None, eos_id: int | None = None,
                           pad_id: int | None = None) -> Path:
    """Write ``out_dir/config.json`` for ``m`` (the family's HF config; token ids when given)."""
    family = family or engine_family(m)
    cfg = family.hf_config(m)
    if eos_id is not None:
        cfg["eos_token_id"] = int(eos_id)
    if pad_id is not None:
        cfg["pad_token_id"] = int(pad_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # megatron DDP / Float16Module
        model = model.module
    return model


def check_single_copy_layout(model: torch.nn.Module) -> None:
    """Refuse layouts whose ranks hold only part of the model (TP, PP or EP > 1)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return
    sizes = {
        "parallel.tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "parallel.pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "parallel.expert_parallel": ps.get_expert_model_parallel_world_size(),
    }
    for key, size in sizes.items():
        if size > 1:
            raise ConvertError(
                f"{key} = {size}: rollout.engine=vllm streams whole parameters from each rank, "
                f"which needs {key} = 1 (data parallelism only); use rollout.engine=megatron"
            )


def hf_named_tensors(model: torch.nn.Module, m: ModelConfig,
                     family: fam.Family | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(HF name, tensor)`` for every parameter of ``model``, one megatron parameter at a
    time (views where the layout allows, fresh tensors for the split ones), detached.

    Raises:
        ConvertError: a converter rule names a parameter the model does not have.
    """
    family = family or engine_family(m)
    params = sequential_expert_names(_unwrap(model).named_parameters())
    geo = fam.geometry(m)
    for rule in family.rules(m):
        if rule.mcore not in params:
            raise ConvertError(
                f"{rule.mcore}: the model has no such parameter (the engine sync maps the local "
                "spec's parameter names; first of the model's: "
                f"{next(iter(params), None)})"
            )
        tensor = params[rule.mcore].detach()
        yield from zip(rule.hf, get_layout(rule.layout).to_hf(tensor, geo), strict=True)


_GROUPED = re.compile(r"(.*\.mlp\.experts)\.weight([12])")


def sequential_expert_names(named: Iterator[tuple[str, torch.nn.Parameter]]) -> dict:
    """``name -> parameter`` with vp2o's GroupedExperts weights (``...mlp.experts.weight1|2``,
    [E, out, in]) presented per expert under megatron SequentialMLP's names
    (``...mlp.experts.local_experts.<e>.linear_fc1|2.weight``, views), the names the
    converter's rules map; every other parameter as it is."""
    params = {}
    for name, p in named:
        hit = _GROUPED.fullmatch(name)
        if hit is None:
            params[name] = p
            continue
        for e in range(p.shape[0]):
            params[f"{hit[1]}.local_experts.{e}.linear_fc{hit[2]}.weight"] = p[e]
    return params


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (what a sync moves)."""
    return sum(p.numel() * p.element_size() for p in _unwrap(model).parameters())
