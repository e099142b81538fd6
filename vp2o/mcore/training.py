"""megatron-core training plumbing: DDP wrap, optimizer, LR schedule, one training step.

Thin functions over megatron's own ``DistributedDataParallel``, ``get_megatron_optimizer``,
``OptimizerParamScheduler`` and forward-backward schedules, so that vp2o's loops read like a
plain PyTorch loop (see ``vp2o/train.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from vp2o.config import Config
from vp2o.dtypes import DTYPES as _DTYPES


def wrap_ddp(model, cfg: Config):
    """Wrap a ``GPTModel`` in megatron's ``DistributedDataParallel`` (fp32 main grads)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.optimizer.grad_reduce_in_fp32,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # Gradients are averaged over the data-parallel ranks, so a global batch gives the same
        # gradient whatever the DP size (tests compare against the single-process run).
        average_in_collective=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_model, cfg: Config):
    """megatron's optimizer for ``ddp_model``: a ChainedOptimizer of dense and expert parts."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    dtype = _DTYPES[cfg.model.params_dtype]
    opt_config = OptimizerConfig(
        optimizer=o.name,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad,
        bf16=cfg.model.params_dtype == "bf16",
        fp16=cfg.model.params_dtype == "fp16",
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    with torch.no_grad():  # see docs/design.md "Releasing a model"
        return get_megatron_optimizer(opt_config, [ddp_model])


def build_scheduler(optimizer, cfg: Config, total_steps: int):
    """Linear warmup then ``cfg.optimizer.decay_style`` down to ``min_lr`` over ``total_steps``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps > 0 else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(total_steps, o.warmup_steps + 1),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict]]
"""(model, micro_batch) -> (loss, metrics). ``loss`` is this micro-batch's contribution: the sum
over this rank's micro-batches is this rank's loss. DDP then averages the gradients over the
data-parallel ranks."""


def forward_backward(
    ddp_model,
    micro_batches: Iterable[dict],
    loss_fn: LossFn,
    *,
    before_grad_reduction: Callable[[Any], None] | None = None,
) -> list[dict]:
    """Run forward and backward over ``micro_batches`` with megatron's no-pipelining schedule.

    Gradients accumulate in the DDP grad buffers; the data-parallel reduction runs at the end
    (``finalize_model_grads``). ``before_grad_reduction(ddp_model)``, if given, runs after the
    last backward and before that reduction (VP2O's Stein transform). Returns each micro-batch's
    metrics.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batches = list(micro_batches)
    num_microbatches = len(micro_batches)
    # Shapes matter to megatron only for pipeline-parallel sends; take them from the tokens.
    first = micro_batches[0]
    tokens = first["tokens"] if "tokens" in first else getattr(first.get("batch"), "tokens", None)
    mbs, seq_length = tuple(tokens.shape[:2]) if tokens is not None else (1, 1)
    it = iter(micro_batches)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = loss_fn(model, batch)

        def reduce(_output_tensor):
            loss, metrics = output
            # megatron's schedule divides a two-value loss by the number of micro-batches; our
            # loss is already this micro-batch's share, so undo that division. (Its MoE aux losses
            # keep megatron's 1/num_microbatches scaling: per-micro-batch means, averaged.)
            return loss * num_microbatches, metrics

        return output[0], reduce

    config = ddp_model.config

    def finalize(model_chunks, num_tokens=None, **kwargs):
        from megatron.core.distributed import finalize_model_grads

        if before_grad_reduction is not None:
            before_grad_reduction(ddp_model)
        return finalize_model_grads(model_chunks, num_tokens, **kwargs)

    config.finalize_model_grads_func = finalize
    forward_backward_func = get_forward_backward_func()
    return forward_backward_func(
        forward_step_func=forward_step,
        data_iterator=it,
        model=[ddp_model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=False,
    )


def zero_grads(ddp_model, optimizer) -> None:
    """Zero the DDP grad buffers and the optimizer's grads before a new step."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()


def grads_finite(ddp_model) -> torch.Tensor:
    """1.0 when every gradient in the DDP buffers is finite on every rank, else 0.0 (a
    collective: every rank decides the same way whether to step)."""
    import torch.distributed as dist

    buffers = ddp_model.buffers + ddp_model.expert_parallel_buffers
    ok = torch.stack([torch.isfinite(b.grad_data).all() for b in buffers]).all().float()
    ok = ok.reshape(1)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok[0]
