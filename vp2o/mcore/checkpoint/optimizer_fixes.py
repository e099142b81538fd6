"""megatron-core 0.16.1 workarounds for saving and loading the state of torch's own optimizers.

**They apply on GPU as much as on the CPU.** What triggers them is the optimizer class, not the
device: megatron-core builds torch's ``Adam``/``AdamW``/``SGD`` and takes its "non-Apex/TE"
code paths whenever neither transformer-engine nor apex can be imported
(megatron/core/optimizer/__init__.py:12-34, distrib_optimizer.py:21-36 ``HAVE_APEX_OR_TE``),
which is the case for every install without the ``te`` extra, GPU machines included. With
transformer-engine's or apex's fused Adam the Adam fixes below match nothing and change
nothing; the SGD fix applies to whichever SGD megatron builds.

Why each exists:

- :func:`materialise_optimizer_state`, before every save and load: megatron builds both the
  saved and the requested optimizer tensors from the per-parameter state that already exists,
  and asserts one common Adam ``step`` over it; torch creates that state lazily at the first
  step, so an optimizer that has not stepped yet (a fresh run loading a checkpoint, a save
  before the first step) would fail or silently miss its state.
- :func:`torch_optimizer_load_fixes`, around the load call only: megatron's load of torch
  Adam's state raises ``KeyError: 'step'`` (1) and then gives every parameter one shared
  ``step`` tensor, which corrupts Adam's bias correction from the next update on (2);
  megatron leaves SGD without the ``init_state_fn`` its load calls (3). Each is described
  there with megatron's file and line.

Nothing global is patched: the load fixes are instance attributes of the optimizer at hand,
removed when the load is done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vp2o.mcore.optim_state import megatron_parts


def materialise_optimizer_state(optimizer) -> None:
    """Create the per-parameter state torch's Adam/AdamW/SGD would create at their first step.

    megatron's checkpoint code needs the state to exist: ``DistributedOptimizer.state_dict``
    asserts one common Adam ``step`` over it (distrib_optimizer.py:641; an optimizer that has not
    stepped yet fails with a bare ``AssertionError`` on save), and the load dict is built from it
    (distrib_optimizer.py:1268, optimizer.py:1018-1021), so state missing on one side is missing
    from the checkpoint or from the request. Missing entries are created exactly as torch's lazy
    initialisation does (Adam: ``step`` 0, zero moments; SGD with momentum: a zero momentum
    buffer, which with megatron's dampening 0 gives the same first update as torch's
    ``clone(grad)``), so the next step computes what it would have computed anyway. (megatron's
    ``_init_optimizer_states_with_dummy_values`` takes an optimizer step on zero gradients
    instead, which with decoupled weight decay changes the parameters.)
    """
    for sub in megatron_parts(optimizer):
        inner = getattr(sub, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if len(state) == 0:
                        on_device = group.get("capturable") or group.get("fused")
                        state["step"] = (
                            torch.zeros((), dtype=_scalar_dtype(), device=p.device)
                            if on_device
                            else torch.tensor(0.0, dtype=_scalar_dtype())
                        )
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                        if group.get("amsgrad"):
                            state["max_exp_avg_sq"] = torch.zeros_like(
                                p, memory_format=torch.preserve_format
                            )
        elif isinstance(inner, torch.optim.SGD):
            for group in inner.param_groups:
                if group.get("momentum", 0) != 0:
                    for p in group["params"]:
                        state = inner.state[p]
                        if state.get("momentum_buffer") is None:
                            state["momentum_buffer"] = torch.zeros_like(p)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@contextlib.contextmanager
def torch_optimizer_load_fixes(optimizer) -> Iterator[None]:
    """Make megatron's optimizers load our checkpoints with torch's own Adam and SGD.

    Covers, for this optimizer object only and only for the duration of the block (instance
    attributes, removed afterwards; nothing global is patched). The state itself is created
    beforehand by :func:`materialise_optimizer_state`.

    1. ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` skips the ``step``
       key (distrib_optimizer.py:2101), but ``_set_main_param_and_optimizer_states`` then copies
       every key of torch Adam's per-parameter state, ``step`` included, from the loaded tensors
       (distrib_optimizer.py:936-940): ``KeyError: 'step'``. The instance method is wrapped so
       that keys absent from the loaded tensors keep their current value (``step`` was already
       set from the param groups by ``load_state_dict``, distrib_optimizer.py:817-826).
    2. ``DistributedOptimizer.load_state_dict`` gives every parameter *the same* ``step`` tensor
       (distrib_optimizer.py:818-825) and torch's ``Optimizer.load_state_dict`` keeps it shared;
       torch Adam increments each parameter's step in place, so after one update the step would
       have advanced once per parameter (wrong bias correction from then on). After the load each
       parameter gets its own copy.
    3. ``FP32Optimizer.sharded_state_dict(is_loading=True)`` calls ``self.init_state_fn``
       (optimizer.py:1018-1019), which ``get_megatron_optimizer`` leaves None for SGD
       (``TypeError``): a no-op stands in (the state already exists).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer

    patched: list[tuple[Any, str]] = []
    distributed = []
    for sub in megatron_parts(optimizer) if optimizer is not None else []:
        inner = getattr(sub, "optimizer", None)
        if isinstance(sub, DistributedOptimizer) and isinstance(
            inner, torch.optim.Adam | torch.optim.AdamW
        ):
            distributed.append(sub)
            sub._set_main_param_and_optimizer_states = _keep_missing_keys(sub)  # (1)
            patched.append((sub, "_set_main_param_and_optimizer_states"))
        elif isinstance(sub, FP32Optimizer) and getattr(sub, "init_state_fn", 0) is None:
            sub.init_state_fn = _no_state_init  # (3)
            patched.append((sub, "init_state_fn"))
    try:
        yield
        for sub in distributed:  # (2)
            for state in sub.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
    finally:
        for obj, name in patched:
            if name == "init_state_fn":
                obj.init_state_fn = None
            else:
                vars(obj).pop(name, None)


def _keep_missing_keys(sub):
    """``sub._set_main_param_and_optimizer_states`` that keeps state absent from ``tensors``."""
    original = type(sub)._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        current = sub._get_main_param_and_optimizer_states(model_param)
        merged = {k: tensors[k] if k in tensors else v for k, v in current.items()}
        return original(sub, model_param, merged)

    return set_states


def _no_state_init(opt, config=None) -> None:
    """Stands in for the missing ``init_state_fn`` of megatron's SGD (state already exists)."""
