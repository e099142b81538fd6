"""Evaluation: held-out accuracy of the training task, and benchmark files.

    vp2o eval --config CONFIG train.init_checkpoint=runs/x/checkpoints/step_00000100
    vp2o eval --config CONFIG --benchmark examples/vp2o/eval/math.jsonl --format math \
        train.init_checkpoint=... train.eval_samples=8 data.max_prompt_tokens=512

Benchmark files and their formats: ``vp2o/eval_formats.py`` and ``docs/results.md``. A sample
is correct when its reward is 1 (``math``, ``choice``; every test passed for ``code``; every
instruction followed, strictly, for ``ifeval``).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from vp2o.config import Config
from vp2o.data.tasks import check_prompt_lengths, encode_rows
from vp2o.rewards.pool import RewardPool
from vp2o.rollout import SamplingParams, generate
from vp2o.session import Session


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al.)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def median_solution_tokens(lengths: list[int], correct: list[bool]) -> float | None:
    """Median response length (tokens) of the correct responses; None when none is correct."""
    solved = [n for n, ok in zip(lengths, correct, strict=True) if ok]
    return float(statistics.median(solved)) if solved else None


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


def _my_chunks(num_rows: int, size: int) -> list[range | None]:
    """The chunks of ``size`` rows that this rank generates, one per round.

    Chunk ``c`` is rows ``[c * size, (c + 1) * size)`` under any number of ranks, and goes to rank
    ``c % world``: a row shares its batch (and its sampling generator) with the same rows as in one
    process, so the results are the one process's. Every rank gets the same number of rounds, so
    the collectives inside ``generate`` pair up; ``None`` is a round with no chunk left for this
    rank, in which it generates a dummy row (the same calls as the other ranks) and discards it.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = [range(i, min(i + size, num_rows)) for i in range(0, num_rows, size)]
    rounds = -(-len(chunks) // world)
    return [chunks[c] if (c := k * world + rank) < len(chunks) else None for k in range(rounds)]


def _gather_in_order(results: list[tuple]) -> list[tuple]:
    """Every rank's ``(first row, ...)`` tuples, on every rank, in row order (one process's)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return sorted((r for g in gathered for r in g), key=lambda r: r[0])


def evaluate(s: Session, pool: RewardPool, *, chunk: int = 128) -> dict:
    """Score the held-out prompts. The ranks share out chunks of ``chunk`` prompts (see
    :func:`_my_chunks`: the result does not depend on the number of ranks); results are gathered
    on all ranks.

    Returns ``held_out_accuracy`` (greedy), ``pass_at_k`` ({k: value} for k up to
    ``train.eval_samples``, sampled at the rollout temperature), ``mean_response_length`` (greedy
    tokens), ``median_solution_tokens`` (greedy tokens of the correct responses) and
    ``num_prompts``.
    """
    rows = s.task.eval
    k_max = max(1, s.cfg.train.eval_samples)
    results = []  # (first row, correct, lengths, correct samples per prompt) per chunk
    for span in _my_chunks(len(rows), chunk):
        part = rows[:1] if span is None else [rows[i] for i in span]
        greedy = _sample(s, part, temperature=0.0, group=1, seed=s.cfg.seed)
        sampled = None
        if k_max > 1:
            sampled = _sample(s, part, temperature=s.cfg.rollout.temperature, group=k_max,
                              seed=s.cfg.seed + 1)
        if span is None:
            continue
        scores = pool.score([r["prompt"] for r in part], greedy.completions, part)
        per_prompt = []
        if sampled is not None:
            expanded = [r for r in part for _ in range(k_max)]
            sc = pool.score([r["prompt"] for r in expanded], sampled.completions, expanded)
            per_prompt = [sum(x >= 1.0 for x in sc.rewards[i * k_max : (i + 1) * k_max])
                          for i in range(len(part))]
        results.append((span.start, [r >= 1.0 for r in scores.rewards],
                        greedy.response_lengths.tolist(), per_prompt))
    ordered = _gather_in_order(results)
    correct = [c for r in ordered for c in r[1]]
    lengths = [n for r in ordered for n in r[2]]
    per_prompt = [n for r in ordered for n in r[3]]
    out = {
        "held_out_accuracy": sum(correct) / max(len(correct), 1),
        "mean_response_length": sum(lengths) / max(len(lengths), 1),
        "median_solution_tokens": median_solution_tokens(lengths, correct),
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


def evaluate_rows(s: Session, pool: RewardPool, rows: list[dict], *, samples: int,
                  temperature: float, chunk: int = 128) -> dict:
    """Score ``samples`` responses per row (greedy when ``temperature`` is 0, then one each).

    Every rank takes a slice of the rows; results are gathered on all ranks. Returns
    ``pass_at_k`` ({k: unbiased pass@k} for k = 1, 2, 4, ... <= n), ``mean_reward`` (partial
    credit included), ``mean_response_length`` (tokens, all samples), ``median_solution_tokens``
    (tokens of the correct samples; None when none is), ``num_prompts``, ``samples_per_prompt``.
    """
    n = 1 if temperature == 0 else max(1, samples)
    results = []  # (first row, correct per prompt, rewards, lengths, correct) per chunk
    for span in _my_chunks(len(rows), max(1, chunk // n)):
        part = rows[:1] if span is None else [rows[i] for i in span]
        batch = _sample(s, part, temperature=temperature, group=n, seed=s.cfg.seed + 1)
        if span is None:
            continue
        expanded = [r for r in part for _ in range(n)]
        sc = pool.score([r["prompt"] for r in expanded], batch.completions, expanded)
        ok = [x >= 1.0 for x in sc.rewards]
        results.append((span.start, [sum(ok[i * n : (i + 1) * n]) for i in range(len(part))],
                        list(sc.rewards), batch.response_lengths.tolist(), ok))
    per_prompt, rewards, lengths, correct = (
        [x for r in _gather_in_order(results) for x in r[i]] for i in range(1, 5)
    )
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n]
    return {
        "pass_at_k": {str(k): sum(pass_at_k(n, c, k) for c in per_prompt) / len(per_prompt)
                      for k in ks},
        "mean_reward": sum(rewards) / len(rewards),
        "mean_response_length": sum(lengths) / len(lengths),
        "median_solution_tokens": median_solution_tokens(lengths, correct),
        "num_prompts": len(per_prompt),
        "samples_per_prompt": n,
        "temperature": temperature,
    }


def run_eval(cfg: Config, *, benchmark: str | None = None, fmt: str = "auto",
             log: Callable[[str], None] = print) -> dict:
    """What ``vp2o eval`` does: load ``train.init_checkpoint`` (its newest checkpoint when it is
    a checkpoints folder; none = the initial weights), score the held-out prompts of the task or,
    with ``benchmark``, that file (``train.eval_samples`` samples per prompt at
    ``rollout.temperature``; greedy when it is 1), and write ``run_dir/eval.json`` (held-out) or
    ``run_dir/eval_<file stem>.json`` (benchmark) on rank 0, which also logs the JSON.
    """
    from vp2o.eval_formats import load_benchmark
    from vp2o.session import load_initial_weights, session

    cfg.require_loop("eval")  # before any process group: free when loaded with loop="eval"
    rows = reward = None
    if benchmark is not None:  # a bad file fails before any process group exists
        rows, reward = load_benchmark(benchmark, fmt)
    with session(cfg, with_optimizer=False) as s:
        if cfg.train.init_checkpoint:
            load_initial_weights(s, cfg.train.init_checkpoint)
        if rows is not None:
            check_prompt_lengths(rows, encode_rows(rows, s.tokenizer.encode),
                                 cfg.data.max_prompt_tokens)
        pool = RewardPool(reward or cfg.reward.name, workers=cfg.reward.workers,
                          timeout_s=cfg.reward.timeout_s)
        try:
            if rows is None:
                result = evaluate(s, pool)
            else:
                n = max(1, cfg.train.eval_samples)
                result = evaluate_rows(s, pool, rows, samples=n,
                                       temperature=cfg.rollout.temperature if n > 1 else 0.0)
                result = {"benchmark": str(benchmark), "reward": reward, **result}
        finally:
            pool.close()
        if s.is_main:
            name = "eval.json" if rows is None else f"eval_{Path(benchmark).stem}.json"
            write_eval(s.run_dir, result, name=name)
            log(json.dumps(result, indent=2))
    return result


def write_eval(run_dir: Path, result: dict, *, name: str = "eval.json") -> Path:
    """``run_dir/eval.json`` (read by ``vp2o report``), or another ``name``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
