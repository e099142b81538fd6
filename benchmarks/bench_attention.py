"""Peak memory and time of one learner forward + backward: megatron's local attention against
``model.core_attention=sdpa``, each on padded micro-batches and on token-budget micro-batches
(``train.max_tokens_per_microbatch``).

    .venv/bin/python benchmarks/bench_attention.py                # the default shape below
    .venv/bin/python benchmarks/bench_attention.py --seq 2048 --batch 4

The batch: ``--batch`` sequences, each a 64-token prompt and a response of a length drawn uniformly
from [seq/8, seq - 64] (fixed seed), left/right padded to the longest as the rollout lays them out.
One step = the learner's ``vp2o.policy_loss.PolicyLoss`` (GRPO's policy loss, the global batch's
normaliser) over the micro-batches and their backward, as ``Learner.gradients`` runs it, without the
optimizer. Each variant runs in a fresh process: peak memory is the process's peak resident set
during the steps minus its peak before them (CPU: model, batch and imports excluded), or torch's
peak allocated CUDA memory above what was allocated before them (GPU). Time: the median of
``--repeats`` steps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = [("local", 0), ("sdpa", 0), ("local", 1), ("sdpa", 1)]  # (attention, packed)


def shape(args: argparse.Namespace) -> list[str]:
    return [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.groups}",
        f"model.num_experts={args.experts}", f"model.moe_router_topk={args.topk}",
        f"model.moe_ffn_hidden_size={args.expert_ffn or args.hidden}", "model.vocab_size=1024",
        f"model.max_position_embeddings={max(4096, args.seq * args.batch)}",
        f"rollout.micro_batch_size={args.micro_batch}",
        f"rollout.max_new_tokens={args.seq}", f"model.params_dtype={args.dtype}",
    ]


def run_variant(args: argparse.Namespace) -> dict:
    """One variant in this process (``--variant attention,packed``)."""
    import torch

    from vp2o.config import load_config
    from vp2o.experience import PendingBatch, micro_batches
    from vp2o.learner import loss_normaliser
    from vp2o.mcore import model as mdl
    from vp2o.mcore import parallel
    from vp2o.policy_loss import PolicyLoss
    from vp2o.rollout.masks import position_ids
    from vp2o.rollout.types import RolloutBatch

    attention, packed = args.variant.split(",")
    packed = int(packed)
    cfg = load_config(None, [*shape(args), f"model.core_attention={attention}"])
    groups = parallel.initialize(cfg, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = mdl.build_model(cfg)
    gen = torch.Generator().manual_seed(1)
    prompt = 64
    lengths = torch.randint(args.seq // 8, args.seq - prompt + 1, (args.batch,), generator=gen)
    width = prompt + int(lengths.max())
    cols = torch.arange(width)
    valid = cols < prompt + lengths.unsqueeze(1)
    response = valid & (cols >= prompt)
    tokens = torch.where(valid, torch.randint(3, 1024, (args.batch, width), generator=gen), 0)
    batch = RolloutBatch(tokens=tokens, position_ids=position_ids(valid), valid=valid,
                         response_mask=response,
                         behavior_logprobs=torch.where(response, -2.0, 0.0),
                         prompt_width=prompt, group_ids=torch.arange(args.batch) // 2)
    pending = PendingBatch(batch=batch, advantages=torch.randn(args.batch, generator=gen),
                           rewards=torch.zeros(args.batch))
    policy_loss = PolicyLoss(cfg, model)
    budget = args.budget or args.seq * args.micro_batch
    mbs = micro_batches(pending, cfg.rollout.micro_batch_size, device,
                        loss_normaliser(pending, cfg, groups),
                        max_tokens=budget if packed else None)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for mb in mbs:
            loss, _ = policy_loss(model, mb)
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak so far
    step()  # warm-up (its peak counts: later steps reuse the freed memory)
    times = [step() for _ in range(args.repeats)]
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    parallel.destroy()
    return {"attention": attention, "packed": bool(packed), "micro_batches": len(mbs),
            "padded_tokens": int(batch.tokens.numel()), "real_tokens": int(valid.sum()),
            "step_s": statistics.median(times), "peak_mib": peak, "device": device.type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--expert-ffn", type=int, default=0, help="0: --hidden")
    ap.add_argument("--seq", type=int, default=1024, help="longest sequence (prompt + response)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4, help="rollout.micro_batch_size")
    ap.add_argument("--budget", type=int, default=0,
                    help="train.max_tokens_per_microbatch (0 = seq x micro-batch)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    argv = [a for a in sys.argv[1:]]
    env = {**os.environ, "MASTER_PORT": os.environ.get("MASTER_PORT", "29531")}
    rows = []
    for attention, packed in VARIANTS:
        out = subprocess.run([sys.executable, __file__, *argv, "--variant",
                              f"{attention},{packed}"], capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"variant {attention},{packed} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"shape: layers={args.layers} d={args.hidden} heads={args.heads}/{args.groups} "
          f"experts={args.experts} batch={args.batch} seq<={args.seq} dtype={args.dtype} "
          f"micro_batch_size={args.micro_batch} budget={args.budget or args.seq * args.micro_batch}"
          f" device={rows[0]['device']}")
    print("| attention | micro-batches | count | tokens run | step (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kind = "packed" if r["packed"] else "padded"
        tokens = r["real_tokens"] if r["packed"] else r["padded_tokens"]
        print(f"| {r['attention']} | {kind} | {r['micro_batches']} | {tokens} | "
              f"{r['step_s']:.3f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
