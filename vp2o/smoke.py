"""A few megatron-core training steps of the tiny MoE on CPU: checks that the install trains.

    vp2o smoke [--steps 40] [--config FILE] [key=value ...]

The task is next-token prediction on sequences that count up from a random start, so the loss
must fall far below log(vocab) (the loss of a uniform guess): a run that does not learn shows.
"""

from __future__ import annotations

import math
import time

import torch

from vp2o.config import Config
from vp2o.mcore import model as mdl
from vp2o.mcore import parallel, training


def counting_batch(gen: torch.Generator, batch: int, seq: int, vocab: int) -> torch.Tensor:
    """[batch, seq + 1] tokens counting up (mod vocab) from a random start."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    return (start + torch.arange(seq + 1)) % vocab  # [B, S+1]


def run(cfg: Config, *, steps: int = 30, batch: int = 8, seq: int = 32, log=print) -> list[float]:
    """Train ``steps`` steps; returns the losses."""
    groups = parallel.initialize(cfg)
    try:
        model = mdl.build_model(cfg)
        ddp = training.wrap_ddp(model, cfg)
        opt = training.build_optimizer(ddp, cfg)
        sched = training.build_scheduler(opt, cfg, total_steps=steps)
        gen = torch.Generator().manual_seed(cfg.seed + groups.dp_rank)

        def loss_fn(m, mb):
            t = mb["tokens"]
            pos = torch.arange(t.shape[1]).unsqueeze(0).expand_as(t)
            per_token = m(t, pos, None, labels=mb["labels"])  # [B, S]
            loss = per_token.float().mean() / 2
            return loss, {"loss": loss.detach()}

        losses = []
        log(
            f"tiny MoE: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{cfg.model.num_layers} layers, {cfg.model.num_experts} experts top-"
            f"{cfg.model.moe_router_topk}; log(vocab) = {math.log(cfg.model.vocab_size):.3f}"
        )
        for step in range(steps):
            t0 = time.perf_counter()
            training.zero_grads(ddp, opt)
            data = counting_batch(gen, batch, seq, cfg.model.vocab_size)
            half = batch // 2
            mbs = [
                {"tokens": data[i : i + half, :-1], "labels": data[i : i + half, 1:]}
                for i in (0, half)
            ]
            out = training.forward_backward(ddp, mbs, loss_fn)
            _, grad_norm, _ = opt.step()
            sched.step(1)
            loss = float(sum(o["loss"] for o in out))  # host sync: logging
            losses.append(loss)
            if step % 5 == 0 or step == steps - 1:
                log(
                    f"step {step:3d}  loss {loss:.4f}  grad_norm {grad_norm:.3f}  "
                    f"{time.perf_counter() - t0:.2f}s"
                )
        return losses
    finally:
        parallel.destroy()
