"""One full training step in VP2O mode and in GRPO mode, same model shape and batch, alternating.

    .venv/bin/python benchmarks/bench_step.py                 # medium CPU config
    .venv/bin/python benchmarks/bench_step.py --rounds 10 --layers 4 --hidden 256 --experts 16

A step is forward + backward over the micro-batches, the gradient reduction, (VP2O: the Stein
transform of the expert gradients, §6-8), the optimizer update, and (VP2O: the prototype refresh,
§4). VP2O also carries its two specialisation losses (§9). Both modes run in one process, one
after the other in each round, so they see the same machine state; the first round is a warm-up.
``--instances`` models are built per mode (default 3) and each is stepped once per round: one
instance can run a few % faster or slower than another of the same shape for the whole process,
so the times of all instances are pooled. Prints the phase breakdown (median seconds per phase
over rounds x instances), the median and quartiles of the paired ratios (each instance's VP2O
step over its GRPO step of the same round, taken next to each other: what load on the machine
does to both cancels), and, last, the ratio of the median totals:

    step time ratio vp2o/grpo: X.XXX

The GRPO baseline is megatron's own MoE layers: the whole of VP2O's machinery (routing
statistics, prototypes, losses, transform) counts as its overhead. ``--with-diagnostics`` adds a
third model, GRPO as ``vp2o train algorithm=grpo`` runs it: VP2O's layers without the losses,
the statistics reduced and the prototypes refreshed every step for the routing diagnostics
(§12), no transport. It gets its own column and a line ``step time ratio vp2o/grpo+diagnostics``
before the last one.

With ``--rollout`` (issue 9) each round also times the rest of an RL step as the trainer runs it:
generation of a rollout batch with the KV cache (``--prompts`` x ``--group`` rows, ``--new-tokens``
new tokens after a ``--prompt-len`` prompt; VP2O records every token's routing for §10, GRPO does
not), the exact-match reward on the decoded completions, and VP2O's post-update check (a no-grad
teacher-forced forward over the rollout batch with routing, then D (§10) and drift/ESS (§11)).
A second table shows the whole RL step by phase, with its own ratio line; the training-step
ratio above stays the last line.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from bench_model import add_model_arguments, build, model_overrides, synthetic_batch

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--instances", type=int, default=3,
                    help="models built per mode; every round steps each once (see below)")
    add_model_arguments(ap)
    ap.add_argument("--with-diagnostics", action="store_true",
                    help="also time GRPO with the trainer's routing diagnostics (see below)")
    ap.add_argument("--rollout", action="store_true",
                    help="also time generation, reward and VP2O's post-update check")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("vp2o_overrides", nargs="*", help="extra overrides for the VP2O run")
    args = ap.parse_args()

    from vp2o.algo import trust_region
    from vp2o.config import load_config
    from vp2o.console import quiet_third_party_warnings
    from vp2o.mcore import parallel, training
    from vp2o.mcore.stein_step import SteinTransform
    from vp2o.rewards import get_reward
    from vp2o.rollout import SamplingParams, generate, sequence_logprobs
    from vp2o.rollout.routing import routing_in_batch_layout

    quiet_third_party_warnings()
    common = model_overrides(args)
    grpo_cfg = load_config(None, [*common, "algorithm=grpo"])
    vp2o_cfg = load_config(None, [*common, "algorithm=vp2o", *args.vp2o_overrides])
    groups = parallel.initialize(grpo_cfg)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def setup(cfg, mode: str):
        """mode: "grpo" (megatron's layers), "grpo+diag" (VP2O's layers, statistics and
        prototypes, no losses or transport: the trainer's GRPO), "vp2o"."""
        model, ddp, opt = build(cfg, mode)
        transform = None
        if mode != "grpo":
            transform = SteinTransform(
                model, cfg.vp2o, groups, num_experts=cfg.model.num_experts, seed=0,
                transport=mode == "vp2o",
            )
        return model, ddp, opt, transform

    # Several instances per mode: on the CPU one model instance can run a few % faster or slower
    # than another of the same shape for the whole process (where its buffers landed in memory),
    # which is as large as the effect measured; stepping each of K instances per round and
    # pooling their times averages that out.
    modes = [("grpo", grpo_cfg), ("vp2o", vp2o_cfg)]
    if args.with_diagnostics:
        modes.append(("grpo+diag", grpo_cfg))
    names = [name for name, _ in modes]
    runs = {(name, i): setup(cfg, name) for i in range(args.instances) for name, cfg in modes}
    gen = torch.Generator().manual_seed(0)
    mbs, loss_fn = synthetic_batch(args, device, gen)
    n_mb = len(mbs)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(key):
        model, ddp, opt, transform = runs[key]
        times = {}
        sync()
        t0 = time.perf_counter()
        training.zero_grads(ddp, opt)

        def timed_transform(d):
            sync()
            a = time.perf_counter()
            transform.before_grad_reduction(d)
            sync()
            times["transform"] = time.perf_counter() - a

        training.forward_backward(
            ddp, mbs, loss_fn, before_grad_reduction=timed_transform if transform else None
        )
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if transform:
            transform.after_optimizer_step()
        sync()
        t3 = time.perf_counter()
        times["forward_backward"] = (t1 - t0) - times.get("transform", 0.0)
        times["optimizer"] = t2 - t1
        times["prototypes"] = t3 - t2
        times["total"] = t3 - t0
        return times

    prompt_ids = torch.randint(2, 2048, (args.prompts, args.prompt_len), generator=gen).tolist()

    class _Tokens:  # the bench's stand-in tokenizer: ids as text
        eos_id, pad_id = 1, 0

        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    exact = get_reward("exact")

    def rollout(key, times):
        """Generate, reward and (VP2O) the post-update check, as ``vp2o.train`` runs them."""
        model, _, _, transform = runs[key]
        vp2o = key[0] == "vp2o"
        params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens,
                                group_size=args.group, record_routing=vp2o)
        sync()
        t0 = time.perf_counter()
        batch = generate(model, prompt_ids, params, tokenizer=_Tokens,
                         generator=torch.Generator(device=device).manual_seed(1))
        sync()
        t1 = time.perf_counter()
        rewards = [exact("", c, {"answer": "7"}) for c in batch.completions]
        t2 = time.perf_counter()
        times["generate"], times["reward"] = t1 - t0, t2 - t1
        if not vp2o:
            return sum(rewards)
        with torch.no_grad():  # Learner.evaluate_update: learner log-probs and gates
            model.eval()
            logp = sequence_logprobs(model, batch, temperature=batch.logprob_temperature)
            recs = [layer.router.last_routing for layer in transform.layers]
            model.train()
            b, s_len = batch.tokens.shape
            ids = routing_in_batch_layout([r.ids for r in recs], b, s_len)
            gates = routing_in_batch_layout([r.gates for r in recs], b, s_len)
            mask = (batch.routing_ids[..., 0] >= 0) & batch.response_mask.unsqueeze(0)
            D = trust_region.anchor_distance(
                ids.cpu(), gates.cpu(), transform.prototypes.unsqueeze(1).cpu(),
                batch.routing_ids.clamp_min(0), batch.routing_gates,
                transform.anchor.unsqueeze(1).cpu(), mask=mask,
            )
            drift, ess = trust_region.behavior_stats(
                logp.cpu(), batch.behavior_logprobs, batch.response_mask, lam=0.5
            )
            float(D), float(drift), float(ess)  # the trainer's accept/refresh decisions sync
        sync()
        times["trust_check"] = time.perf_counter() - t2
        return sum(rewards)

    records = {name: [] for name in names}
    paired = []  # vp2o / grpo of the same instance index in the same round (adjacent in time)
    for r in range(args.rounds + 1):
        this_round = {}
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]  # alternating modes
        for key in order:
            name = key[0]
            t = step(key)
            if args.rollout:
                rollout(key, t)
                t["rl_total"] = t["total"] + sum(
                    t[k] for k in ("generate", "reward", "trust_check") if k in t
                )
            if r > 0:  # round 0 warms up all
                records[name].append(t)
                this_round[key] = t["total"]
        paired += [this_round[("vp2o", i)] / this_round[("grpo", i)]
                   for i in range(args.instances) if ("vp2o", i) in this_round]

    def table(phases):
        print(f"{'phase (s)':<18}" + "".join(f"{n:>11}" for n in names))
        for ph in phases:
            row = {n: statistics.median(t.get(ph, 0.0) for t in records[n]) for n in names}
            medians[ph] = row
            print(f"{ph:<18}" + "".join(f"{row[n]:>11.4f}" for n in names))

    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {dev}; torch threads {torch.get_num_threads()}; "
          f"{args.layers} layers, d={args.hidden}, {args.experts} experts top-{args.topk}, "
          f"f={args.expert_ffn}, seq {args.seq}, batch {args.batch} ({n_mb} micro-batches), "
          f"{args.dtype}; median of {args.rounds} rounds x {args.instances} instances")
    medians: dict[str, dict[str, float]] = {}
    table(["forward_backward", "transform", "optimizer", "prototypes", "total"])
    if args.rollout:
        print(f"\nRL step with rollout ({args.prompts} prompts x {args.group} samples, "
              f"{args.prompt_len} prompt + {args.new_tokens} new tokens; the training step above)")
        table(["generate", "reward", "forward_backward", "transform", "optimizer",
               "prototypes", "trust_check", "rl_total"])
        rl = medians["rl_total"]
        print(f"rl step time ratio vp2o/grpo (with rollout): {rl['vp2o'] / rl['grpo']:.3f}\n")
    parallel.destroy()
    total = medians["total"]
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    print(f"paired vp2o/grpo (same instance, same round): median {q[1]:.3f}, "
          f"quartiles {q[0]:.3f}-{q[2]:.3f} over {len(paired)} pairs")
    if args.with_diagnostics:
        print(f"step time ratio vp2o/grpo+diagnostics: {total['vp2o'] / total['grpo+diag']:.3f}")
    print(f"step time ratio vp2o/grpo: {total['vp2o'] / total['grpo']:.3f}")


if __name__ == "__main__":
    main()
