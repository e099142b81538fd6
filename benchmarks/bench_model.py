"""The model and batch that ``bench_step.py`` and ``profile_step.py`` time (a helper, not a
benchmark): one place for the medium config's shape, the models per mode and the synthetic
policy-gradient batch, so the two scripts measure the same thing."""

from __future__ import annotations

import argparse

import torch

VOCAB = 2048


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The shape options (defaults: the medium CPU config of issue 4)."""
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--expert-ffn", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides for both modes, e.g. model.moe_grouped_gemm=true")


def model_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides of that shape (add ``algorithm=...``)."""
    return [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
        "model.num_attention_heads=8", "model.num_query_groups=4",
        f"model.ffn_hidden_size={4 * args.hidden}", f"model.num_experts={args.experts}",
        f"model.moe_router_topk={args.topk}", f"model.moe_ffn_hidden_size={args.expert_ffn}",
        f"model.vocab_size={VOCAB}", f"model.params_dtype={args.dtype}",
        "optimizer.lr=1e-5", "optimizer.clip_grad=1.0", *args.set,
    ]


def build(cfg, mode: str):
    """(model, megatron DDP, optimizer) for ``mode``: "grpo" (megatron's own MoE layers), else
    VP2O's layers, with the specialisation losses on for "vp2o" only. Seeded: every instance of
    a mode starts from the same weights."""
    from vp2o.mcore import model as mdl
    from vp2o.mcore import training, vp2o_moe

    torch.manual_seed(0)
    hook = None if mode == "grpo" else vp2o_moe.vp2o_layer_spec_hook(cfg)
    model = mdl.build_model(cfg, layer_spec_hook=hook)
    ddp = training.wrap_ddp(model, cfg)
    opt = training.build_optimizer(ddp, cfg)
    if mode == "vp2o":
        vp2o_moe.configure_losses(
            model, ortho_coeff=cfg.vp2o.ortho_coeff, variance_coeff=cfg.vp2o.variance_coeff
        )
    return model, ddp, opt


def synthetic_batch(args: argparse.Namespace, device: torch.device, gen: torch.Generator):
    """(micro-batches, loss_fn): random tokens and advantages drawn from ``gen``, and a
    policy-gradient surrogate of the same cost as GRPO's, -A * log pi(token)."""
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=gen).to(device)
    advantages = torch.randn(args.batch, generator=gen).to(device)
    n_mb, mb = args.batch // args.micro_batch, args.micro_batch
    pos = torch.arange(args.seq, device=device).unsqueeze(0).expand(mb, -1)

    def loss_fn(m, batch):
        logp = -m(batch["tokens"], pos, None, labels=batch["labels"]).float()  # [b, S]
        return -(logp * batch["adv"].unsqueeze(1)).mean() / n_mb, {}

    mbs = [{"tokens": tokens[i * mb:(i + 1) * mb, :-1], "labels": tokens[i * mb:(i + 1) * mb, 1:],
            "adv": advantages[i * mb:(i + 1) * mb]} for i in range(n_mb)]
    return mbs, loss_fn
