"""A tiny training run for the checkpoint tests, shared by the in-process tests and the torchrun
worker (tests/checkpoint/ckpt_worker.py).

Weights start from generators seeded by each parameter's global name, so every layout (EP=1 or
2) starts from identical weights; the data of step s is the same global batch at every layout,
each data-parallel rank taking its share.
"""

from __future__ import annotations

import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torchrun import launcher, worker_env

from vp2o.config import Config, load_config
from vp2o.mcore import model as mdl
from vp2o.mcore import training

GLOBAL_BATCH, SEQ = 4, 12
WORKER = Path(__file__).with_name("ckpt_worker.py")

SMALL_MODEL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "model.moe_ffn_hidden_size=64",
    "model.num_experts=4",
    "model.vocab_size=128",
]


def small_config(
    *,
    ep: int = 1,
    optimizer: str = "adam",
    distributed: bool = True,
    extra: list[str] | None = None,
) -> Config:
    """The small MoE (2 layers, d=64, 4 experts, top-2) with AdamW (or SGD), warmup + cosine."""
    return load_config(
        None,
        [
            *SMALL_MODEL,
            f"parallel.expert_parallel={ep}",
            f"parallel.use_distributed_optimizer={distributed}",
            f"optimizer.name={optimizer}",
            "optimizer.lr=0.003",
            "optimizer.min_lr=0.0003",
            "optimizer.warmup_steps=2",
            "optimizer.weight_decay=0.01",
            "optimizer.clip_grad=1.0",
            *(extra or []),
        ],
    )


@dataclass
class Run:
    """One rank's model, DDP wrapper, optimizer and scheduler."""

    cfg: Config
    model: object
    ddp: object
    opt: object
    sched: object

    @property
    def ep_rank(self) -> int:
        from vp2o.mcore import parallel

        return parallel.groups().ep_rank

    @property
    def n_local(self) -> int:
        return self.cfg.model.num_experts // self.cfg.parallel.expert_parallel


def build_run(cfg: Config, *, total_steps: int = 10) -> Run:
    """Model (name-seeded init), DDP, optimizer, scheduler (after parallel.initialize)."""
    from vp2o.mcore import parallel

    g = parallel.groups()
    model = mdl.build_model(cfg)
    n_local = cfg.model.num_experts // cfg.parallel.expert_parallel
    with torch.no_grad():
        for name, p in model.named_parameters():
            gname = mdl.global_param_name(name, ep_rank=g.ep_rank, num_local_experts=n_local)
            gen = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ddp = training.wrap_ddp(model, cfg)
    opt = training.build_optimizer(ddp, cfg)
    sched = training.build_scheduler(opt, cfg, total_steps)
    return Run(cfg, model, ddp, opt, sched)


def batch(cfg: Config, step: int) -> torch.Tensor:
    """The global batch of ``step``: [GLOBAL_BATCH, SEQ + 1] token ids."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, cfg.model.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)


def train_step(run: Run, step: int) -> float:
    """One optimizer step on the global batch of ``step``; returns the global mean loss."""
    from vp2o.mcore import parallel

    g = parallel.groups()
    dp = dist.get_world_size(g.dp_cp)
    per_rank = GLOBAL_BATCH // dp
    local = batch(run.cfg, step)[g.dp_rank * per_rank : (g.dp_rank + 1) * per_rank]
    mbs = [{"tokens": local[:, :-1], "labels": local[:, 1:]}]

    def loss_fn(m, b):
        t = b["tokens"]
        pos = torch.arange(t.shape[1]).unsqueeze(0).expand_as(t)
        loss = m(t, pos, None, labels=b["labels"]).float().mean()
        return loss, {"loss": loss.detach()}

    training.zero_grads(run.ddp, run.opt)
    out = training.forward_backward(run.ddp, mbs, loss_fn)
    loss = out[0]["loss"].reshape(1).clone()
    dist.all_reduce(loss, group=g.dp_cp)
    run.opt.step()
    run.sched.step(1)
    return loss.item() / dp


def global_params(run: Run) -> dict[str, torch.Tensor]:
    """This rank's parameters under global expert names (copies)."""
    out = {}
    for name, p in run.model.named_parameters():
        gname = mdl.global_param_name(name, ep_rank=run.ep_rank, num_local_experts=run.n_local)
        out[gname] = p.detach().clone()
    return out


def all_global_params(run: Run) -> dict[str, torch.Tensor]:
    """Every rank's parameters under global names, merged (on every rank)."""
    mine = global_params(run)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    merged: dict[str, torch.Tensor] = {}
    for d in gathered:
        merged.update(d)
    return merged




def run_worker(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ckpt_worker.py args`` under torchrun with ``nproc`` ranks (or plain python for 0)."""
    cmd = [*launcher(nproc), str(WORKER), *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=worker_env(),
        start_new_session=True,  # the kill worker SIGKILLs its own process group
    )
