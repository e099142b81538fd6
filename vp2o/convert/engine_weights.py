"""The learner's weights as an inference engine reads them: HF config and HF-named tensors.

:func:`engine_family` picks the registered family (``vp2o.convert.families``) that expresses a
``model:`` config exactly; :func:`write_engine_model_dir` writes the ``config.json`` (no weights:
the engine starts from dummy weights and the first sync loads the real ones);
:func:`hf_named_tensors` streams the model's parameters under their HF names through the
converter's own rules and layouts (one megatron parameter converted at a time, so at most one
parameter's HF copy exists beyond the model itself).

The stream covers tensor = pipeline parallel size 1 with any data and expert parallelism: every
rank feeds its own engine the whole model, so under expert parallelism each MoE layer's expert
weights are all-gathered over the expert-parallel group when the stream reaches that layer (one
layer's experts beyond the model at a time, freed at the next layer). Tensor and pipeline
parallelism are refused naming the setting (a rank would need parameters that several ranks of
other groups hold).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
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
    """Refuse layouts the stream cannot serve: tensor, pipeline or expert-tensor parallel > 1."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return
    sizes = {
        "parallel.tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "parallel.pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "parallel.expert_tensor_parallel": ps.get_expert_tensor_parallel_world_size(),
    }
    for key, size in sizes.items():
        if size > 1:
            raise ConvertError(
                f"{key} = {size}: rollout.engine=vllm streams whole parameters to each rank's "
                f"engine, which needs {key} = 1 (data and expert parallelism only); use "
                "rollout.engine=megatron"
            )


def hf_named_tensors(model: torch.nn.Module, m: ModelConfig,
                     family: fam.Family | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(HF name, tensor)`` for every parameter of the whole model, one megatron
    parameter at a time (views where the layout allows, fresh tensors for the split ones),
    detached. Under expert parallelism every rank yields every expert: a collective over the
    expert-parallel group per MoE layer, so all its ranks must consume the stream together.

    Raises:
        ConvertError: a converter rule names a parameter the model does not have.
    """
    family = family or engine_family(m)
    params = sequential_expert_names(_unwrap(model).named_parameters(), _ExpertGather.current())
    geo = fam.geometry(m)
    for rule in family.rules(m):
        if rule.mcore not in params:
            raise ConvertError(
                f"{rule.mcore}: the model has no such parameter (the engine sync maps the local "
                "spec's parameter names; first of the model's: "
                f"{next(iter(params), None)})"
            )
        tensor = params[rule.mcore]
        tensor = (tensor() if callable(tensor) else tensor).detach()
        yield from zip(rule.hf, get_layout(rule.layout).to_hf(tensor, geo), strict=True)


_GROUPED = re.compile(r"(.*\.mlp\.experts)\.weight([12])")
_SEQUENTIAL = re.compile(r"(.*\.mlp\.experts)\.local_experts\.(\d+)\.linear_fc([12])\.weight")


class _ExpertGather:
    """One MoE layer's expert weights at a time, all-gathered over the expert-parallel group.

    Megatron gives expert-parallel rank r the experts ``r * E_local .. (r + 1) * E_local - 1``
    (the order the gathered stack keeps); the stack of the layer last asked for is kept until
    another layer's is asked for (the family's rules go expert by expert within a layer)."""

    def __init__(self, group, size: int) -> None:
        self.group, self.size = group, size
        self.layer: str | None = None
        self.stacks: dict[str, torch.Tensor] = {}

    @classmethod
    def current(cls) -> _ExpertGather | None:
        """The gather of this process's expert-parallel group; None without one (size 1)."""
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return None
        size = ps.get_expert_model_parallel_world_size()
        return cls(ps.get_expert_model_parallel_group(), size) if size > 1 else None

    def stacked(self, layer: str, key: str, local: Callable[[], torch.Tensor]) -> torch.Tensor:
        """[E, ...] of ``key`` (a layer's fc1 or fc2) from this rank's [E_local, ...]."""
        import torch.distributed as dist

        if layer != self.layer:
            self.layer, self.stacks = layer, {}
        if key not in self.stacks:
            mine = local().detach().contiguous()
            stack = mine.new_empty((self.size * mine.shape[0], *mine.shape[1:]))
            dist.all_gather_into_tensor(stack, mine, group=self.group)  # no concatenating copy
            self.stacks[key] = stack
        return self.stacks[key]


def sequential_expert_names(named: Iterator[tuple[str, torch.nn.Parameter]],
                            gather: _ExpertGather | None = None) -> dict:
    """``name -> parameter`` with every expert weight under megatron SequentialMLP's names for
    the whole model (``...mlp.experts.local_experts.<e>.linear_fc1|2.weight``, e global): vp2o's
    GroupedExperts weights (``...mlp.experts.weight1|2``, [E, out, in]) as per-expert views;
    under expert parallelism (``gather``) each expert as a function that gathers its layer's
    stack first. Every other parameter as it is."""
    params: dict = {}
    local_experts: dict[str, list[torch.Tensor]] = {}  # (layer, fc) -> SequentialMLP's, local
    for name, p in named:
        grouped, sequential = _GROUPED.fullmatch(name), _SEQUENTIAL.fullmatch(name)
        if grouped is not None and gather is None:
            for e in range(p.shape[0]):
                params[f"{grouped[1]}.local_experts.{e}.linear_fc{grouped[2]}.weight"] = p[e]
        elif grouped is not None:
            _add_gathered(params, gather, grouped[1], grouped[2], p.shape[0], lambda p=p: p)
        elif sequential is not None and gather is not None:
            local_experts.setdefault(f"{sequential[1]}|{sequential[3]}", []).append(p)
        else:
            params[name] = p
    for key, stack in local_experts.items():
        layer, fc = key.split("|")
        _add_gathered(params, gather, layer, fc, len(stack), lambda s=stack: torch.stack(s))
    return params


def _add_gathered(params: dict, gather: _ExpertGather, layer: str, fc: str, local: int,
                  stack: Callable[[], torch.Tensor]) -> None:
    """Entries for all ``local * gather.size`` experts of ``layer``'s ``fc``, each gathering
    the layer's stack when first read."""
    for e in range(local * gather.size):
        params[f"{layer}.local_experts.{e}.linear_fc{fc}.weight"] = (
            lambda e=e: gather.stacked(layer, fc, stack)[e])

