"""Worker for the multi-process equivalence tests (run by tests/mcore/test_distributed.py).

    torchrun --nproc_per_node=N tests/mcore/dist_train_worker.py --ep E --optimizer sgd|adam \
        --distributed-optimizer 0|1 [--vp2o --alpha A --ortho B --identity] --out result.pt

Trains the tiny MoE for 3 steps on a fixed global batch of 4 sequences, each rank taking its
data-parallel share, and saves (rank 0 gathers) per step: the global mean loss and every reduced
gradient this rank holds (with the distributed optimizer only the shard this rank owns, as flat
ranges), and the parameters after the last step, all under global expert names.
"""

import argparse
import zlib

import torch
import torch.distributed as dist

from vp2o.config import load_config
from vp2o.mcore import model as mdl
from vp2o.mcore import parallel, training, vp2o_moe
from vp2o.mcore.stein_step import SteinTransform

GLOBAL_BATCH, SEQ, STEPS = 4, 16, 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--distributed-optimizer", type=int, default=0)
    ap.add_argument("--dispatcher", default="alltoall")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--vp2o", action="store_true", help="VP2O layers + Stein transform")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--ortho", type=float, default=1e-3)
    ap.add_argument("--identity", action="store_true", help="masks leave only the diagonal")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rollback", action="store_true",
                    help="after the steps: save, one more step, restore (optim_state.Rollback)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(
        None,
        [
            f"parallel.expert_parallel={args.ep}",
            f"optimizer.name={args.optimizer}",
            "optimizer.lr=0.05" if args.optimizer == "sgd" else "optimizer.lr=0.001",
            "optimizer.clip_grad=0.0",
            "optimizer.weight_decay=0.0",
            f"parallel.use_distributed_optimizer={bool(args.distributed_optimizer)}",
            f"model.moe_token_dispatcher_type={args.dispatcher}",
            f"algorithm={'vp2o' if args.vp2o else 'grpo'}",
            f"model.params_dtype={args.dtype}",
            f"vp2o.alpha={args.alpha}",
            *(["vp2o.coactive_top_m=0", "vp2o.coactive_min_frac=2.0"] if args.identity else []),
        ],
    )
    g = parallel.initialize(cfg)
    hook = vp2o_moe.vp2o_layer_spec_hook(cfg) if args.vp2o else None
    model = mdl.build_model(cfg, layer_spec_hook=hook)
    n_local = cfg.model.num_experts // cfg.parallel.expert_parallel
    init_by_global_name(model, ep_rank=g.ep_rank, num_local_experts=n_local)
    ddp = training.wrap_ddp(model, cfg)
    opt = training.build_optimizer(ddp, cfg)
    transform = None
    if args.vp2o:
        vp2o_moe.configure_losses(model, ortho_coeff=args.ortho, variance_coeff=0.0)
        transform = SteinTransform(
            model, cfg.vp2o, g, num_experts=cfg.model.num_experts, seed=cfg.seed
        )

    dp_size = dist.get_world_size() // cfg.parallel.model_parallel_size
    gen = torch.Generator().manual_seed(1)
    shape = (args.steps, GLOBAL_BATCH, SEQ + 1)
    data = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    per_rank = GLOBAL_BATCH // dp_size
    mbs_per_rank = 2 if per_rank >= 2 else 1
    mb = per_rank // mbs_per_rank

    def loss_fn(m, batch):
        t = batch["tokens"]
        pos = torch.arange(t.shape[1]).unsqueeze(0).expand_as(t)
        per_token = m(t, pos, None, labels=batch["labels"])  # [b, S]
        loss = per_token.float().mean() / mbs_per_rank
        return loss, {"loss": loss.detach()}

    record = {"loss": [], "grads": [], "params": {}, "C": [], "prototypes": [], "maps": []}
    if transform is not None:
        # Routing maps of every router call, by an independent forward hook (brute-force C).
        for layer in transform.layers:
            layer.router.register_forward_hook(
                lambda mod, inp, out: record["maps"].append((mod.layer_number, out[1].clone()))
            )
    def forward_backward(step):
        training.zero_grads(ddp, opt)
        local = data[step, g.dp_rank * per_rank : (g.dp_rank + 1) * per_rank]
        mbs = [
            {
                "tokens": local[i * mb : (i + 1) * mb, :-1],
                "labels": local[i * mb : (i + 1) * mb, 1:],
            }
            for i in range(mbs_per_rank)
        ]
        before = transform.before_grad_reduction if transform else None
        return training.forward_backward(ddp, mbs, loss_fn, before_grad_reduction=before)

    for step in range(args.steps):
        out = forward_backward(step)
        loss = sum(o["loss"] for o in out).reshape(1)
        dist.all_reduce(loss, group=g.dp_cp)
        record["loss"].append(loss.item() / dp_size)
        record["grads"].append(_held_grads(model, opt, g, n_local, args.distributed_optimizer))
        opt.step()
        if transform is not None:
            record["C"].append(transform.coactivation.clone())
            transform.after_optimizer_step()
            record["prototypes"].append(transform.prototypes.clone())
    if args.rollback:
        record["rollback"] = _rollback_check(model, opt, lambda: forward_backward(0))
    for name, p in model.named_parameters():
        gname = mdl.global_param_name(name, ep_rank=g.ep_rank, num_local_experts=n_local)
        record["params"][gname] = p.detach().clone()
    if transform is not None:
        record["state"] = transform.state_dict()

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    if dist.get_rank() == 0:
        torch.save(gathered, args.out)
    parallel.destroy()


def _rollback_check(model, opt, forward_backward) -> dict:
    """Save, step, restore: how far every parameter, main param and optimizer state tensor
    is from its value before the step (0 when exact), and how far the step had moved them."""
    from vp2o.mcore.optim_state import Rollback, max_difference, step_state

    rollback = Rollback(model, opt)
    before = [t.clone() for t in step_state(model, opt)]
    rollback.save()
    forward_backward()
    opt.step()
    moved = max_difference(step_state(model, opt), before)
    rollback.restore()
    return {"moved": moved, "after_restore": max_difference(step_state(model, opt), before),
            "copied_params": len(rollback.copied_params)}


def init_by_global_name(model, *, ep_rank, num_local_experts, std=0.02):
    """Weights drawn from a generator seeded by each parameter's global name, so every layout
    (EP=1 or 2, DP=1 or 2) starts from identical weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            gname = mdl.global_param_name(
                name, ep_rank=ep_rank, num_local_experts=num_local_experts
            )
            gen = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _held_grads(model, opt, g, n_local, distributed):
    """Reduced gradients this rank holds: name -> (start, end, flat values)."""
    ranges = {}
    if distributed:
        for sub in opt.chained_optimizers:
            for p in sub.model_param_gbuf_map:
                r = sub._get_model_param_range_map(p)["param"]
                ranges[p] = (r.start, r.end)
    held = {}
    for name, p in model.named_parameters():
        gname = mdl.global_param_name(name, ep_rank=g.ep_rank, num_local_experts=n_local)
        flat = p.main_grad.detach().reshape(-1)
        start, end = ranges.get(p, (0, flat.numel())) if distributed else (0, flat.numel())
        if distributed and p not in ranges:
            continue
        held[gname] = (start, end, flat[start:end].clone())
    return held


if __name__ == "__main__":
    main()
