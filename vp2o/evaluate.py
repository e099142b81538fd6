"""Held-out evaluation: greedy accuracy, pass@k (unbiased estimator), response length.

    vp2o eval --config CONFIG train.init_checkpoint=runs/x/checkpoints/step_00000100
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from vp2o.rewards.pool import RewardPool
from vp2o.rollout import SamplingParams, generate
from vp2o.session import Session


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al.)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _sample(s: Session, rows: list[dict], *, temperature: float, group: int, seed: int):
    params = SamplingParams(
        temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=s.cfg.rollout.max_new_tokens,
        stop_strings=list(s.cfg.rollout.stop_strings), group_size=group, record_routing=False,
    )
    prompts = [s.tokenizer.encode(r["prompt"]) for r in rows]
    gen = torch.Generator().manual_seed(seed)
    s.model.eval()
    with torch.no_grad():
        batch = generate(s.model, prompts, params, tokenizer=s.tokenizer, generator=gen,
                         sync_group=dist.group.WORLD)
    s.model.train()
    return batch


def evaluate(s: Session, pool: RewardPool, *, chunk: int = 128) -> dict:
    """Score the held-out prompts. Every rank takes a slice; results are gathered on all ranks.

    Returns ``held_out_accuracy`` (greedy), ``pass_at_k`` ({k: value} for k up to
    ``train.eval_samples``, sampled at the rollout temperature), ``mean_response_length`` (greedy
    tokens) and ``num_prompts``.
    """
    rows = s.task.eval
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = rows[rank::world]
    correct, lengths, per_prompt = [], [], []
    k_max = max(1, s.cfg.train.eval_samples)
    for start in range(0, max(len(mine), 1), chunk):
        part = mine[start : start + chunk]
        if not part:  # ranks with no rows still join every collective of generate()
            part = rows[:1]
        greedy = _sample(s, part, temperature=0.0, group=1, seed=s.cfg.seed)
        scores = pool.score([r["prompt"] for r in part], greedy.completions, part)
        if start < len(mine):
            correct += [r >= 1.0 for r in scores.rewards]
            lengths += greedy.response_lengths.tolist()
        if k_max > 1 and start < len(mine):
            sampled = _sample(s, part, temperature=s.cfg.rollout.temperature, group=k_max,
                              seed=s.cfg.seed + 1)
            expanded = [r for r in part for _ in range(k_max)]
            sc = pool.score([r["prompt"] for r in expanded], sampled.completions, expanded)
            for i in range(len(part)):
                per_prompt.append(sum(x >= 1.0 for x in sc.rewards[i * k_max : (i + 1) * k_max]))
    gathered = [None] * world
    dist.all_gather_object(gathered, (correct, lengths, per_prompt))
    correct = [c for g in gathered for c in g[0]]
    lengths = [n for g in gathered for n in g[1]]
    per_prompt = [n for g in gathered for n in g[2]]
    out = {
        "held_out_accuracy": sum(correct) / max(len(correct), 1),
        "mean_response_length": sum(lengths) / max(len(lengths), 1),
        "num_prompts": len(correct),
    }
    ks = [k for k in (1, 2, 4, 8, 16) if k <= k_max]
    if per_prompt:
        out["pass_at_k"] = {
            str(k): sum(pass_at_k(k_max, c, k) for c in per_prompt) / len(per_prompt) for k in ks
        }
    else:
        out["pass_at_k"] = {"1": out["held_out_accuracy"]}
    return out


def write_eval(run_dir: Path, result: dict) -> Path:
    """``run_dir/eval.json`` (read by ``vp2o report``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "eval.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
