"""Undoing an optimizer step: the trust region's rollback (method §10), on megatron's optimizers.

    rollback = Rollback(model, optimizer)   # once, after any checkpoint load
    for step in ...:
        rollback.save()                     # before the step
        ... forward/backward, optimizer.step() ...
        if rejected:                        # a decision every rank shares
            rollback.restore()              # collective under the distributed optimizer

**What is copied.** The optimizers' main params and their state (Adam's moments and step, SGD's
momentum), keyed by the live tensors themselves, so state that the step creates (Adam's moments
appear at the first step) is told apart and dropped on restore; and the parameters that neither
of the two below covers (none in the layouts the rollback tests build).

**What is not copied.** Parameters whose memory is exactly an optimizer parameter's (megatron's
``FP32Optimizer`` steps the parameters themselves; the distributed optimizer at data-parallel
size 1 steps views of the whole buffer), and parameters that megatron writes from the main params
after each step (bf16 params of the mixed-precision optimizers: their rounded main params; with
the distributed optimizer every parameter in its buffers: the owners' shards, all-gathered).

**What is rebuilt.** :meth:`Rollback.restore` writes those parameters the way megatron's own
step does (the rounded copy; the distributed optimizer's all-gather), so a rollback costs the
fp32 main params and the optimizer state of the rank's shard, not a second copy of the model,
and the parameters come back bit for bit.

:func:`step_state` lists every tensor a step writes, for checks that a restore put everything
back (:func:`max_difference` of two of them is 0.0).
"""

from __future__ import annotations

import copy

import torch


class Rollback:
    """Saves the state an optimizer step changes and puts it back (§10 rollback).

    Args:
        model: the ``GPTModel`` (or megatron's ``DistributedDataParallel`` around it) whose
            parameters ``optimizer`` steps.
        optimizer: megatron's optimizer (``vp2o.mcore.training.build_optimizer``): a
            ``ChainedOptimizer`` of dense and expert parts, or one part.
    """

    def __init__(self, model, optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self._uncovered: list[torch.nn.Parameter] | None = None
        self._saved: dict | None = None

    @property
    def copied_params(self) -> list[torch.nn.Parameter]:
        """The parameters neither stepped in place nor rebuilt from main params, which
        :meth:`save` therefore copies (empty in the layouts ``vp2o.mcore.training`` builds).
        Found once, at the first call (after any checkpoint load): parameters, main params and
        megatron's buffers keep their memory for the rest of the run, so the per-step save does
        not walk every parameter's storage again."""
        if self._uncovered is None:
            covered = set()
            for part in megatron_parts(self.optimizer):
                covered.update(_memory(p) for g in part.optimizer.param_groups
                               for p in g["params"])
                covered.update(_memory(p) for p in _params_written_from_main(part))
            self._uncovered = [p for p in self.model.parameters() if _memory(p) not in covered]
        return self._uncovered

    def save(self) -> None:
        """Copy the optimizers' main params and state, and the :attr:`copied_params` (the
        previous save is dropped first). Local: no communication."""
        self._saved = None  # at most one save alive while the next one is copied
        optimizers = []
        for part in megatron_parts(self.optimizer):
            opt = part.optimizer
            main = {p: p.data.clone() for g in opt.param_groups for p in g["params"]}
            state = {p: {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                         for k, v in st.items()} for p, st in opt.state.items()}
            optimizers.append((part, main, state))
        params = {p: p.data.clone() for p in self.copied_params}
        self._saved = {"params": params, "optimizers": optimizers}

    @torch.no_grad()  # megatron's copy writes the parameters through the optimizer's shard
    def restore(self) -> None:  # views, made without autograd (training.build_optimizer)
        """Undo the steps since the last :meth:`save`: main params and optimizer state as saved
        (state created since is dropped), then the parameters from them as megatron's own step
        writes them (rounded copy; the distributed optimizer's all-gather: a collective, which
        every rank must reach, so the decision to restore must be the same on every rank).
        The save is kept: a second restore puts the same state back.

        Raises:
            RuntimeError: nothing was saved.
        """
        if self._saved is None:
            raise RuntimeError("Rollback.restore() before any save(): nothing to restore")
        for p, value in self._saved["params"].items():
            p.data.copy_(value)
        chunks = {}
        for part, main, state in self._saved["optimizers"]:
            opt = part.optimizer
            for p, value in main.items():
                p.data.copy_(value)
            for p in list(opt.state.keys()):
                if p not in state:
                    del opt.state[p]  # created by the rejected step
            for p, st in state.items():
                opt.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            if _writes_model_params(part):
                part._copy_main_params_to_model_params()
            if _is_distributed(part):  # a stub part (no shard here) still joins the all-gather
                chunks.update((id(chunk), chunk) for chunk in part.model_chunks)
        for chunk in chunks.values():
            chunk.start_param_sync(force_sync=True)  # overlap_param_gather is off (config)


def step_state(model, optimizer) -> list[torch.Tensor]:
    """Every tensor an optimizer step writes, live and in a fixed order: the model's parameters,
    then per megatron optimizer part its main params, each followed by its state tensors. What a
    rollback must put back (the rollback checks compare these bit for bit)."""
    out = [p.detach() for p in model.parameters()]
    for part in megatron_parts(optimizer):
        inner = part.optimizer
        for p in (q for group in inner.param_groups for q in group["params"]):
            out.append(p.detach())
            out += [v for v in inner.state.get(p, {}).values() if torch.is_tensor(v)]
    return out


def max_difference(now: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """The largest absolute elementwise difference between two lists of tensors of the same
    shapes (two :func:`step_state` s, the earlier one cloned), in float32: 0.0 when a restore
    put everything back. One host sync per tensor: for checks, not for the training loop."""
    return max(float((x.float() - y.float()).abs().max())  # sync
               for x, y in zip(now, before, strict=True))


def megatron_parts(optimizer) -> list:
    """The megatron optimizers inside a (Chained) optimizer (dense and expert parts)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _memory(t: torch.Tensor) -> tuple:
    """Where a tensor's elements live: (storage address, offset, count, dtype, contiguous)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype,
            t.is_contiguous())


def _is_distributed(part) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(part, DistributedOptimizer)


def _writes_model_params(part) -> bool:
    """Whether megatron's step writes ``part``'s model params from its main params (the
    mixed-precision optimizers: Float16OptimizerWithFloat16Params, DistributedOptimizer)."""
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    return isinstance(part, MixedPrecisionOptimizer) and not getattr(
        part, "is_stub_optimizer", False)


def _params_written_from_main(part) -> list:
    """Model params that ``part``'s step rewrites whole from main params (module docstring)."""
    if _is_distributed(part):
        # Every param of the DDP buffers: the local shard from this rank's main params, the rest
        # by the all-gather from the other ranks' (megatron's step, and ``Rollback.restore``).
        return [p for chunk in part.model_chunks
                for buffer in chunk.buffers + chunk.expert_parallel_buffers
                for p in buffer.params]
    if _writes_model_params(part):  # Float16OptimizerWithFloat16Params: rounded main params
        return [p for group in part.float16_groups for p in group]
    return []
