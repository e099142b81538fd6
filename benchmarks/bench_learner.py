"""Learner throughput: vp2o's megatron-core learner against Hugging Face's Qwen3MoeForCausalLM.

    .venv/bin/python benchmarks/bench_learner.py            # demo + large shape, 256 and 1024
    .venv/bin/python benchmarks/bench_learner.py --shapes large --lengths 1024 --rounds 2
    .venv/bin/python benchmarks/bench_learner.py --quick    # smoke: demo, 2 x 64 tokens, 1 round

What is timed: one learner step, forward + backward + optimizer step with GRPO's policy loss,
in tokens per second (sequences x length / median step seconds; prompt tokens included: the
forward runs them). The same MoE, the same tokens, fp32, CPU (or the current CUDA device):

- vp2o: megatron-core's ``GPTModel`` built by ``vp2o.mcore.model.build_model`` with megatron's
  own MoE layers (``algorithm=grpo``), wrapped in megatron's DDP, with megatron's optimizer
  (``vp2o.mcore.training.build_optimizer``: a ChainedOptimizer of torch AdamW, grad clip
  ``optimizer.clip_grad``), stepped as the learner steps it (``training.forward_backward``
  over the micro-batches, then ``optimizer.step``), log-probs from
  ``vp2o.rollout.sequence_logprobs`` (the learner's own forward, its attention mask included).
  Learner options: ``model.core_attention=sdpa`` and ``model.moe_grouped_gemm=true`` (vp2o's
  ``GroupedExperts``); a shape where either fails to build or run falls back (sdpa with
  SequentialMLP, then local attention) and the output says so.
- hf: ``transformers.Qwen3MoeForCausalLM`` (what TRL trains) from the ``Qwen3MoeConfig`` that
  ``vp2o.convert``'s qwen3_moe family writes for the same ``model:`` section (so the same
  hidden size, layers, heads, KV heads, head dim, experts, top-k, expert ffn, norm_topk_prob =
  not moe_router_pre_softmax, vocab, RoPE theta, RMS eps, q/k norm, no shared expert, every
  layer MoE), ``attn_implementation="sdpa"``, transformers' default experts implementation
  (printed), token log-probs by ``log_softmax`` of the logits, torch AdamW with the same
  hyper-parameters and ``clip_grad_norm_``.

Both sides compute the loss with ``vp2o.algo.grpo.policy_loss`` (clipped ratio, the config's
clip range and aggregation, the whole batch's normaliser over the micro-batches), fixed random
advantages, ``logp_old`` = the detached log-probs, a response mask over the last 3/4 of every
sequence. Both models hold the same weights: the megatron parameters are converted with
``vp2o.convert.engine_weights.hf_named_tensors`` (the engine sync's converter) and loaded into
the HF model, and before timing the two log-probs of the first batch of each shape must agree
within ``--check-tol`` (the run stops otherwise). The model is Qwen3-MoE: q/k RMSNorm on
(``model.qk_layernorm=true``), untied output layer, vocab 64 at both shapes.

Shapes: demo = examples/vp2o/configs/shared/demo.yaml (4 layers, d=128, 4 heads, 2 query groups,
8 experts top-2, expert ffn 128); large = 8 layers, d=1024, 16 heads, 4 query groups (head dim
64), 64 experts top-8, expert ffn 256 (~425 M parameters, ~72 M active per token; both models
and their optimizer states take ~15 GiB). Each shape's two models are built once and stepped
at every length. Each (shape, length) runs ``--warmup`` untimed rounds (default: 1 at a shape's
first length, 0 at the next ones, whose models, optimizer states and kernels are already warm),
then the timed ones; a round is one vp2o step then one hf step, so the two see the same machine
state; medians over the timed rounds. ``--rounds 0`` (the default) times as many rounds as fit
in ~2 minutes by the first round run, 1 to 5. Micro-batches: ``--micro-batch`` sequences,
default as many as make 2048 tokens (8 x 256: one micro-batch; 8 x 1024: four of 2), the same
on both sides, gradients accumulated over them (the learner's own default,
``rollout.micro_batch_size`` = 64, would keep 8 x 1024 tokens of the large shape's activations
at once).

Printed per (shape, length): micro-batches, timed rounds, tokens/s of each side, the ratio
vp2o/hf, and each side's achieved FLOP/s as a fraction of this machine's fp32 matmul rate (the
best of repeated 2048 x 2048 @ 2048 x 2048 ``torch.mm``, measured first). The last line is the
ratio of the largest case run (the large shape at 1024 tokens by default):

    learner speedup vp2o/hf: X.XX

Run time of the default invocation on a quiet 2-core CPU, estimated from a 2 x 64-token run of
the large shape: 10-20 minutes, most of it the large shape at 1024 tokens (~3.5 TFLOP per step
and side, ~2-5 minutes a step, one timed round). ``--shapes demo`` or ``--lengths 256`` take
minutes; ``--rounds 3`` buys steadier medians for more time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import re
import resource
import statistics
import time
import warnings

import torch
from bench_model import build

warnings.filterwarnings("ignore")

VOCAB = 64
SHAPES = {
    "demo": dict(layers=4, hidden=128, heads=4, groups=2, experts=8, topk=2, expert_ffn=128),
    "large": dict(layers=8, hidden=1024, heads=16, groups=4, experts=64, topk=8, expert_ffn=256),
}
OPTIONS = [("sdpa", True), ("sdpa", False), ("local", False)]  # (core_attention, grouped gemm)
QUICK = dict(shapes=["demo"], lengths=[64], seqs=2, rounds=1, warmup=1, matmul_reps=3)
DEFAULTS = dict(shapes=["demo", "large"], lengths=[256, 1024], seqs=8, rounds=0, warmup=-1,
                matmul_reps=5)  # warmup -1: 1 round at a shape's first length, 0 after
ROUND_BUDGET_S = 120.0  # --rounds 0: timed rounds per case ~ this / one warm-up round, 1 to 5
MICRO_TOKENS = 2048  # --micro-batch 0: sequences per micro-batch ~ this many tokens


def overrides(shape: dict, max_len: int, attention: str, grouped: bool) -> list[str]:
    """The ``model:`` section of a shape (all layers MoE, Qwen3-MoE's q/k norm) for GRPO."""
    s = shape
    return [
        f"model.num_layers={s['layers']}", f"model.hidden_size={s['hidden']}",
        f"model.num_attention_heads={s['heads']}", f"model.num_query_groups={s['groups']}",
        f"model.ffn_hidden_size={2 * s['hidden']}", f"model.num_experts={s['experts']}",
        f"model.moe_router_topk={s['topk']}", f"model.moe_ffn_hidden_size={s['expert_ffn']}",
        f"model.vocab_size={VOCAB}", f"model.max_position_embeddings={max_len}",
        "model.qk_layernorm=true", "model.params_dtype=fp32",
        f"model.core_attention={attention}", f"model.moe_grouped_gemm={str(grouped).lower()}",
        "algorithm=grpo",
    ]


def matmul_flops(reps: int) -> float:
    """This machine's fp32 matmul rate (FLOP/s): best of ``reps`` 2048^3 products."""
    n = 2048
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def active_params(model, topk: int, experts: int) -> float:
    """Parameters one token multiplies through: every parameter but the input embedding table
    (a lookup, not a matmul), the routed experts' counted k/E (only top-k of E run)."""
    from vp2o.mcore.model import is_expert_param

    n = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embedding."):
            continue
        n += p.numel() * (topk / experts if is_expert_param(name) else 1.0)
    return n


def make_batch(seqs: int, length: int, gen: torch.Generator):
    """(RolloutBatch, advantages): random tokens, no padding, the response the last 3/4."""
    from vp2o.rollout.masks import position_ids
    from vp2o.rollout.types import RolloutBatch

    tokens = torch.randint(0, VOCAB, (seqs, length), generator=gen)
    valid = torch.ones(seqs, length, dtype=torch.bool)
    prompt = length // 4
    response = valid & (torch.arange(length) >= prompt)
    batch = RolloutBatch(tokens=tokens, position_ids=position_ids(valid), valid=valid,
                         response_mask=response, behavior_logprobs=torch.zeros(seqs, length),
                         prompt_width=prompt, group_ids=torch.arange(seqs))
    return batch, torch.randn(seqs, generator=gen)


def split(batch, adv, micro: int) -> list[tuple]:
    """Micro-batches of ``micro`` sequences: (RolloutBatch, advantages)."""
    out = []
    for i in range(0, batch.tokens.shape[0], micro):
        sl = slice(i, i + micro)
        out.append((dataclasses.replace(
            batch, tokens=batch.tokens[sl], position_ids=batch.position_ids[sl],
            valid=batch.valid[sl], response_mask=batch.response_mask[sl],
            behavior_logprobs=batch.behavior_logprobs[sl], group_ids=batch.group_ids[sl]),
            adv[sl]))
    return out


def grpo_loss(cfg, logp, adv, mask, denominator):
    """GRPO's policy loss of one micro-batch (logp_old = detached logp: one update per batch)."""
    from vp2o.algo import grpo
    from vp2o.policy_loss import clip_options

    loss, _ = grpo.policy_loss(logp, logp.detach(), adv, mask, **clip_options(cfg),
                               aggregation=cfg.loss.aggregation, denominator=denominator)
    return loss


class Vp2oLearner:
    """megatron-core model, DDP and optimizer, stepped as ``vp2o.learner.Learner`` steps."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model, self.ddp, self.opt = build(cfg, "grpo")
        self.mbs: list[dict] = []

    def set_batch(self, parts, denominator, device) -> None:
        self.mbs = [{"batch": dataclasses.replace(
            b, tokens=b.tokens.to(device), position_ids=b.position_ids.to(device),
            valid=b.valid.to(device), response_mask=b.response_mask.to(device)),
            "adv": a.to(device), "denominator": denominator} for b, a in parts]

    def logp(self, batch) -> torch.Tensor:
        from vp2o.rollout import sequence_logprobs

        return sequence_logprobs(self.ddp, batch, temperature=1.0)

    def loss_fn(self, model, mb: dict):
        from vp2o.rollout import sequence_logprobs

        b = mb["batch"]
        logp = sequence_logprobs(model, b, temperature=1.0)  # [b, S], 0 off the response
        return grpo_loss(self.cfg, logp, mb["adv"], b.response_mask, mb["denominator"]), {}

    def step(self) -> None:
        from vp2o.mcore import training

        training.zero_grads(self.ddp, self.opt)
        training.forward_backward(self.ddp, self.mbs, self.loss_fn)
        self.opt.step()

    def options(self) -> str:
        layer = self.model.decoder.layers[0]
        attn = type(layer.self_attention.core_attention).__name__
        experts = type(layer.mlp.experts).__name__
        disp = self.cfg.model.moe_token_dispatcher_type
        return f"core attention {attn}, experts {experts}, dispatcher {disp}"


class HFLearner:
    """``Qwen3MoeForCausalLM`` with the megatron model's weights, torch AdamW, TRL's log-probs."""

    def __init__(self, cfg, mcore_model):
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        from vp2o.convert import families as fam

        self.cfg = cfg
        raw = fam.get_family("qwen3_moe").hf_config(cfg.model)  # refuses what it can't express
        raw.update(output_router_logits=False, router_aux_loss_coef=0.0, use_cache=False)
        raw.pop("torch_dtype", None)
        hf_cfg = fam.load_hf_config(raw)
        assert isinstance(hf_cfg, Qwen3MoeConfig), type(hf_cfg)
        m = cfg.model
        assert hf_cfg.norm_topk_prob == (not m.moe_router_pre_softmax)
        assert hf_cfg.decoder_sparse_step == 1 and not hf_cfg.mlp_only_layers
        assert hf_cfg.head_dim == m.head_dim and hf_cfg.num_key_value_heads == m.num_query_groups
        self.model = Qwen3MoeForCausalLM._from_config(
            hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
        self.model.to(next(mcore_model.parameters()).device)
        load_mcore_weights(self.model, mcore_model, m)
        self.model.train()
        o = cfg.optimizer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                                     betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
        self.mbs: list[tuple] = []
        self.denominator = None

    def set_batch(self, parts, denominator, device) -> None:
        self.mbs = [(b.tokens.to(device), b.response_mask.to(device), a.to(device))
                    for b, a in parts]
        self.denominator = denominator

    def logp(self, tokens, response) -> torch.Tensor:
        """log p(x_s | x_<s) at response positions, 0 elsewhere (sequence_logprobs' layout)."""
        logits = self.model(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                            use_cache=False).logits  # [b, S, V]
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        lp = lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [b, S-1]
        lp = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)
        return torch.where(response, lp, torch.zeros_like(lp))

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        for tokens, response, adv in self.mbs:
            logp = self.logp(tokens, response)
            grpo_loss(self.cfg, logp, adv, response, self.denominator).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.clip_grad)
        self.opt.step()

    def options(self) -> str:
        c = self.model.config
        return (f"attn_implementation {c._attn_implementation}, "
                f"experts_implementation {c._experts_implementation}")


def load_mcore_weights(hf_model, mcore_model, m) -> None:
    """Copy the megatron model's parameters into ``hf_model`` through vp2o's converter
    (``hf_named_tensors``: the engine sync's rules and layouts, GroupedExperts included); per-expert
    HF tensors are stacked into transformers' fused ``gate_up_proj`` / ``down_proj`` where the
    HF model keeps its experts fused (transformers >= 5)."""
    from vp2o.convert.engine_weights import hf_named_tensors

    target = dict(hf_model.named_parameters())
    fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    done = set()
    with torch.no_grad():
        for name, t in hf_named_tensors(mcore_model, m):
            if name in target:
                target[name].copy_(t)
                done.add(name)
                continue
            hit = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
            if hit is None:
                raise KeyError(f"{name}: no such parameter in the HF model")
            fused.setdefault(hit[1], {}).setdefault(int(hit[2]), {})[hit[3]] = t
        for prefix, per in fused.items():
            order = sorted(per)
            gate_up = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]])
                                   for e in order])
            target[f"{prefix}.gate_up_proj"].copy_(gate_up)
            target[f"{prefix}.down_proj"].copy_(torch.stack([per[e]["down_proj"] for e in order]))
            done |= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
    missing = sorted(set(target) - done)
    if missing:
        raise KeyError(f"HF parameters not set from the megatron model: {missing[:5]}")


def build_pair(name: str, shape: dict, max_len: int, batch, device):
    """(cfg, vp2o learner, hf learner, max |diff| of the first batch's log-probs, fallback
    note) for a shape: the first learner options in ``OPTIONS`` that build and run a forward."""
    from vp2o.config import load_config
    from vp2o.mcore import parallel

    batch = dataclasses.replace(
        batch, tokens=batch.tokens.to(device), position_ids=batch.position_ids.to(device),
        valid=batch.valid.to(device), response_mask=batch.response_mask.to(device))
    note = ""
    for attention, grouped in OPTIONS:
        cfg = load_config(None, overrides(shape, max_len, attention, grouped))
        parallel.initialize(cfg, seed=0)
        try:
            a = Vp2oLearner(cfg)
            with torch.no_grad():
                lp_a = a.logp(batch)
            break
        except (ValueError, RuntimeError, NotImplementedError) as e:
            note += (f"{name}: core_attention={attention}, moe_grouped_gemm={grouped} failed "
                     f"({type(e).__name__}: {str(e)[:200]}); falling back. ")
            gc.collect()
    else:
        raise RuntimeError(note)
    b = HFLearner(cfg, a.model)
    with torch.no_grad():
        lp_b = b.logp(batch.tokens, batch.response_mask)
    return cfg, a, b, float((lp_a - lp_b).abs().max()), note


def one_round(learners: dict, device: torch.device) -> dict[str, float]:
    """One step of each learner, in order (vp2o, then hf): seconds per learner."""
    out = {}
    for key, learner in learners.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        learner.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[key] = time.perf_counter() - t0
    return out


def profile_step(learners: dict, device: torch.device, label: str, top: int) -> None:
    """One step of each learner under torch.profiler; print its ``top`` ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for key, learner in learners.items():
        with profile(activities=activities) as prof:
            learner.step()
        print(f"\nprofile {label} {key}: one step, top {top} ops by self time")
        print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=48))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: demo large")
    ap.add_argument("--lengths", nargs="+", type=int, help="tokens per sequence (256 1024)")
    ap.add_argument("--seqs", type=int, help="sequences per step (8)")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help=f"sequences per forward/backward (0 = {MICRO_TOKENS} tokens' worth)")
    ap.add_argument("--rounds", type=int,
                    help=f"timed rounds per case (0 = as many as ~{ROUND_BUDGET_S:.0f} s allow, "
                         "1 to 5)")
    ap.add_argument("--warmup", type=int,
                    help="untimed rounds per case (default: 1 at a shape's first length, 0 after)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--check-tol", type=float, default=1e-4,
                    help="max |log-prob difference| allowed between the two models")
    ap.add_argument("--quick", "--tiny", action="store_true",
                    help="smoke run: demo shape, 2 sequences of 64 tokens, 1 round")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after each case's timed rounds, one more step of each learner under "
                         "torch.profiler: print its N most expensive ops (self time)")
    args = ap.parse_args()
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))

    from vp2o.algo import grpo
    from vp2o.console import quiet_third_party_warnings
    from vp2o.mcore import parallel

    quiet_third_party_warnings()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = matmul_flops(args.matmul_reps)
    lengths = sorted(args.lengths)
    print(f"device: {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads; fp32; "
          f"{args.seqs} sequences per step; after the warm-up, the median of the timed rounds "
          f"(each: a vp2o step, then an hf step)")
    print(f"fp32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s (the FLOP fractions' denominator)")
    results = []  # (flop per step, label, ratio)
    header = (f"{'case':<14}{'mbs':>4}{'rounds':>7}{'vp2o tok/s':>12}{'hf tok/s':>12}"
              f"{'vp2o/hf':>9}"
              f"{'vp2o FLOP':>11}{'hf FLOP':>9}")
    for name in args.shapes:
        shape = SHAPES[name]
        gen = torch.Generator().manual_seed(0)
        batches = {L: make_batch(args.seqs, L, gen) for L in lengths}
        cfg, a, b, diff, note = build_pair(name, shape, max(lengths), batches[lengths[0]][0],
                                           device)
        if note:
            print(f"fallback: {note}")
        n_active = active_params(a.model, shape["topk"], shape["experts"])
        print(f"\n{name}: {shape['layers']} layers, d={shape['hidden']}, heads "
              f"{shape['heads']}/{shape['groups']}, {shape['experts']} experts top-"
              f"{shape['topk']}, expert ffn {shape['expert_ffn']}, vocab {VOCAB}; "
              f"{n_active / 1e6:.1f} M active params/token")
        print(f"  vp2o options: {a.options()}; megatron optimizer "
              f"({type(a.opt).__name__} of torch AdamW)")
        print(f"  hf options: {b.options()}; torch AdamW + clip_grad_norm_")
        print(f"  weights: megatron -> HF via vp2o.convert; log-probs of the first batch "
              f"max |diff| {diff:.2e} (tol {args.check_tol:g})")
        if not diff <= args.check_tol:
            raise SystemExit(f"{name}: the two models' log-probs differ by {diff:.2e} > "
                             f"{args.check_tol:g}: not the same model, comparison stopped")
        print(header)
        for L in lengths:
            batch, adv = batches[L]
            micro = args.micro_batch or max(1, min(args.seqs, MICRO_TOKENS // L))
            parts = split(batch, adv, micro)
            denominator = grpo.batch_normaliser(batch.response_mask,
                                                aggregation=cfg.loss.aggregation)
            a.set_batch(parts, denominator.to(device), device)
            b.set_batch(parts, denominator.to(device), device)
            pair = {"vp2o": a, "hf": b}
            n_warm = args.warmup if args.warmup >= 0 else int(L == lengths[0])
            warm = [one_round(pair, device) for _ in range(n_warm)]
            kept, rounds = [], args.rounds
            if not rounds:  # as many as fit the per-case budget, judged by one round
                if not warm:
                    kept.append(one_round(pair, device))
                last = (warm or kept)[-1]
                rounds = max(1, min(5, int(ROUND_BUDGET_S / sum(last.values()))))
            while len(kept) < rounds:
                kept.append(one_round(pair, device))
            times = {k: [t[k] for t in kept] for k in ("vp2o", "hf")}
            tokens = args.seqs * L
            # Training FLOPs per step = 6 x N_active x tokens (2 forward + 4 backward per
            # weight and token; N_active: active_params). Attention's score and value products
            # (which grow with L) are not counted, so the fraction is a lower bound.
            flop = 6 * n_active * tokens
            med = {k: statistics.median(v) for k, v in times.items()}
            tps = {k: tokens / med[k] for k in med}
            frac = {k: flop / med[k] / peak for k in med}
            ratio = tps["vp2o"] / tps["hf"]
            label = f"{name} L={L}"
            print(f"{label:<14}{len(parts):>4}{rounds:>7}{tps['vp2o']:>12.1f}{tps['hf']:>12.1f}"
                  f"{ratio:>9.2f}{100 * frac['vp2o']:>10.1f}%{100 * frac['hf']:>8.1f}%")
            results.append((flop, label, ratio))
            if args.profile:
                profile_step(pair, device, label, args.profile)
        del a, b, pair
        gc.collect()
    parallel.destroy()
    flop, label, ratio = max(results)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"\nmbs: micro-batches per step; FLOP: achieved 6 x active params x tokens / s over "
          f"the matmul rate; peak resident memory {rss:.1f} GiB; last line: {label}, the "
          "largest case run")
    print(f"learner speedup vp2o/hf: {ratio:.2f}")


if __name__ == "__main__":
    main()
