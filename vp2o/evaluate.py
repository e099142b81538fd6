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
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from vp2o.config import Config
from vp2o.data.tasks import check_prompt_lengths, encode_rows
from vp2o.engines import awake_engine, check_engine_settings
from vp2o.eval_stats import (
    EvalHistory,
    pass_at_k,
    routing_counts,
    routing_metrics,
    skill_accuracy,
)
from vp2o.files import write_text_atomic
from vp2o.rewards.pool import RewardPool
from vp2o.rollout import SamplingParams
from vp2o.session import Session

__all__ = ["EVAL_TEMPERATURE", "EvalHistory", "evaluate", "evaluate_rows",
           "median_solution_tokens", "pass_at_k", "run_eval", "sample_records", "write_eval",
           "write_samples"]

EVAL_TEMPERATURE = 1.0
"""Temperature of the sampled held-out responses (``pass@k``, ``response_len``): the policy's own
distribution, whatever ``rollout.temperature`` trains at."""
PASS_KS = (1, 4, 8)
"""The flat ``pass@<k>`` keys of :func:`evaluate` (for k <= ``train.eval_samples``)."""


def median_solution_tokens(lengths: list[int], correct: list[bool]) -> float | None:
    """Median response length (tokens) of the correct responses; None when none is correct."""
    solved = [n for n, ok in zip(lengths, correct, strict=True) if ok]
    return float(statistics.median(solved)) if solved else None


def _sample(s: Session, rows: list[dict], *, temperature: float, group: int, seed: int,
            record_routing: bool = False):
    params = SamplingParams(
        temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=s.cfg.rollout.max_new_tokens,
        stop_strings=list(s.cfg.rollout.stop_strings), group_size=group,
        record_routing=record_routing,
    )
    prompts = [s.tokenizer.encode(r["prompt"]) for r in rows]
    gen = torch.Generator().manual_seed(seed)
    with awake_engine(s) as engine:
        return engine.generate(prompts, params, generator=gen)


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


def evaluate(s: Session, pool: RewardPool, *, chunk: int = 128,
             samples: list[dict] | None = None) -> dict:
    """Score the held-out prompts. The ranks share out chunks of ``chunk`` prompts (see
    :func:`_my_chunks`: the result does not depend on the number of ranks); results are gathered
    on all ranks.

    Greedy responses (one per prompt) give ``held_out_accuracy``, ``mean_response_length`` and
    ``median_solution_tokens`` (tokens; of the correct responses, None when none is),
    ``num_prompts``, ``skill/<name>/accuracy`` (rows with a ``skill`` field, e.g.
    ``data.task=skills``), and the routing of their generated tokens
    ``routing/expert_entropy/layer<i>`` and ``routing/mi_skill_expert/layer<i>`` (two skills or
    more; see :mod:`vp2o.eval_stats`). With ``train.eval_samples`` = n > 1, n responses per
    prompt sampled at ``EVAL_TEMPERATURE`` give ``pass@<k>`` for k in 1, 4, 8 (k <= n; unbiased
    estimator), ``pass_at_k`` ({k: value} for k in 1, 2, 4, 8, 16 <= n; with n = 1 it holds
    ``{"1": held_out_accuracy}``) and ``response_len`` (their mean tokens).

    With ``samples`` (a list), every response is appended to it in row order, greedy ones
    first per row (:func:`sample_records`), on every rank.
    """
    rows = s.task.eval
    k_max = max(1, s.cfg.train.eval_samples)
    skills = _skill_names(rows)
    results = []  # (first row, correct, lengths, correct samples per prompt, sampled lengths,
    #               routing counts, sample records) per chunk
    for span in _my_chunks(len(rows), chunk):
        part = rows[:1] if span is None else [rows[i] for i in span]
        greedy = _sample(s, part, temperature=0.0, group=1, seed=s.cfg.seed, record_routing=True)
        sampled = None
        if k_max > 1:
            sampled = _sample(s, part, temperature=EVAL_TEMPERATURE, group=k_max,
                              seed=s.cfg.seed + 1)
        if span is None:
            continue
        scores = pool.score([r["prompt"] for r in part], greedy.completions, part)
        per_prompt, sampled_lengths, records = [], [], []
        if samples is not None:
            records = sample_records(span, part, greedy, scores.rewards, "greedy", 1)
        if sampled is not None:
            expanded = [r for r in part for _ in range(k_max)]
            sc = pool.score([r["prompt"] for r in expanded], sampled.completions, expanded)
            per_prompt = [sum(x >= 1.0 for x in sc.rewards[i * k_max : (i + 1) * k_max])
                          for i in range(len(part))]
            sampled_lengths = sampled.response_lengths.tolist()
            if samples is not None:
                records += sample_records(span, part, sampled, sc.rewards, "sampled", k_max)
                records.sort(key=lambda r: r["row"])  # stable: per row, greedy first
        results.append((span.start, [r >= 1.0 for r in scores.rewards],
                        greedy.response_lengths.tolist(), per_prompt, sampled_lengths,
                        _routing_counts(s, greedy, part, skills), records))
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
        out.update(_sampled_metrics(per_prompt, [n for r in ordered for n in r[4]], k_max))
    else:
        out["pass_at_k"] = {"1": out["held_out_accuracy"]}
    out.update(skill_accuracy([_skill_of(r) for r in rows], correct))  # both in row order
    counts = [r[5] for r in ordered if r[5] is not None]
    if counts:
        out.update({k: v for k, v in routing_metrics(sum(counts)).items() if v is not None})
    if samples is not None:
        samples.extend(x for r in ordered for x in r[6])
    return out


def sample_records(span: range, part: list[dict], batch, rewards: list[float], kind: str,
                   n: int) -> list[dict]:
    """One record per response of ``batch`` (``n`` per row of ``part``, rows ``span``): the row
    index, ``kind`` (greedy or sampled) and the sample's number, the prompt, the reference
    answer and skill where the row has them, the completion, its reward and its tokens."""
    lengths = batch.response_lengths.tolist()
    out = []
    for j, completion in enumerate(batch.completions):
        row = part[j // n]
        record = {"row": span.start + j // n, "kind": kind, "sample": j % n,
                  "prompt": row["prompt"]}
        for key in ("answer", "skill"):
            if row.get(key) is not None:
                record[key] = row[key]
        record.update(completion=completion, reward=float(rewards[j]),
                      response_tokens=int(lengths[j]))
        out.append(record)
    return out


def write_samples(path: Path, records: list[dict]) -> Path:
    """``records`` as JSON lines, the whole file or none of it (``vp2o.files``)."""
    return write_text_atomic(path, "".join(
        json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records))


def _skill_of(row: dict) -> str | None:
    return None if row.get("skill") is None else str(row["skill"])


def _skill_names(rows: list[dict]) -> list[str | None]:
    """The skills of ``rows``, sorted, then None when some row has none: the routing counts'
    row order (the same on every rank: every rank holds every held-out row)."""
    names = {_skill_of(r) for r in rows}
    return sorted(n for n in names if n is not None) + ([None] if None in names else [])


def _routing_counts(s: Session, batch, part: list[dict], skills: list[str | None]):
    """[Lm, skills, E] counts of the experts chosen for the generated tokens of ``batch`` (the
    responses to ``part``, one each), or None when the generation recorded no routing."""
    if batch.routing_ids.numel() == 0:
        return None
    labels = torch.tensor([skills.index(_skill_of(r)) for r in part], dtype=torch.long)
    return routing_counts(batch.routing_ids, batch.response_mask, labels,
                          num_labels=len(skills), num_experts=s.cfg.model.num_experts)


def _sampled_metrics(per_prompt: list[int], lengths: list[int], n: int) -> dict[str, float]:
    """``pass@<k>`` (k in ``PASS_KS``, k <= n) from each prompt's correct samples out of n, and
    ``response_len``, the mean of the sampled responses' lengths."""
    out = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in per_prompt) / len(per_prompt)
           for k in PASS_KS if k <= n}
    out["response_len"] = sum(lengths) / max(len(lengths), 1)
    return out


def evaluate_rows(s: Session, pool: RewardPool, rows: list[dict], *, samples: int,
                  temperature: float, chunk: int = 128,
                  records: list[dict] | None = None) -> dict:
    """Score ``samples`` responses per row (greedy when ``temperature`` is 0, then one each).

    Every rank takes a slice of the rows; results are gathered on all ranks. Returns
    ``pass_at_k`` ({k: unbiased pass@k} for k = 1, 2, 4, ... <= n), ``mean_reward`` (partial
    credit included), ``mean_response_length`` (tokens, all samples), ``median_solution_tokens``
    (tokens of the correct samples; None when none is), ``num_prompts``, ``samples_per_prompt``.
    With ``records`` (a list), every response is appended to it in row order
    (:func:`sample_records`).
    """
    n = 1 if temperature == 0 else max(1, samples)
    results = []  # (first row, correct per prompt, rewards, lengths, correct, records) per chunk
    for span in _my_chunks(len(rows), max(1, chunk // n)):
        part = rows[:1] if span is None else [rows[i] for i in span]
        batch = _sample(s, part, temperature=temperature, group=n, seed=s.cfg.seed + 1)
        if span is None:
            continue
        expanded = [r for r in part for _ in range(n)]
        sc = pool.score([r["prompt"] for r in expanded], batch.completions, expanded)
        ok = [x >= 1.0 for x in sc.rewards]
        kind = "greedy" if temperature == 0 else "sampled"
        mine = [] if records is None else sample_records(span, part, batch, sc.rewards, kind, n)
        results.append((span.start, [sum(ok[i * n : (i + 1) * n]) for i in range(len(part))],
                        list(sc.rewards), batch.response_lengths.tolist(), ok, mine))
    ordered = _gather_in_order(results)
    per_prompt, rewards, lengths, correct = (
        [x for r in ordered for x in r[i]] for i in range(1, 5)
    )
    if records is not None:
        records.extend(x for r in ordered for x in r[5])
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
             log_samples: bool = False, log: Callable[[str], None] = print) -> dict:
    """What ``vp2o eval`` does: load ``train.init_checkpoint`` (its newest checkpoint when it is
    a checkpoints folder; none = the initial weights), score the held-out prompts of the task
    (:func:`evaluate`) or, with ``benchmark``, that file (``train.eval_samples`` samples per
    prompt at ``rollout.temperature``; greedy when it is 1), and write ``run_dir/eval.json``
    (held-out) or ``run_dir/eval_<file stem>.json`` (benchmark) on rank 0, which also logs the
    JSON. With ``log_samples``, every response with its prompt, reference answer and reward also
    goes to ``eval_samples.jsonl`` / ``eval_<file stem>_samples.jsonl`` beside it.
    """
    from vp2o.eval_formats import load_benchmark
    from vp2o.session import load_initial_weights, session

    cfg.require_loop("eval")  # before any process group: free when loaded with loop="eval"
    check_engine_settings(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any weights
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
        records = [] if log_samples else None
        try:
            if rows is None:
                result = evaluate(s, pool, samples=records)
            else:
                n = max(1, cfg.train.eval_samples)
                result = evaluate_rows(s, pool, rows, samples=n,
                                       temperature=cfg.rollout.temperature if n > 1 else 0.0,
                                       records=records)
                result = {"benchmark": str(benchmark), "reward": reward, **result}
        finally:
            pool.close()
        if s.is_main:
            stem = "eval" if rows is None else f"eval_{Path(benchmark).stem}"
            if records is not None:
                path = write_samples(s.run_dir / f"{stem}_samples.jsonl", records)
                result = {**result, "samples_file": str(path)}
            write_eval(s.run_dir, result, name=f"{stem}.json")
            log(json.dumps(result, indent=2))
    return result


def write_eval(run_dir: Path, result: dict, *, name: str = "eval.json",
               history: EvalHistory | None = None) -> Path:
    """``run_dir/eval.json`` (read by ``vp2o report``), or another ``name``: ``result`` (the
    final evaluation), and with a non-empty ``history`` its ``summary()`` under ``"history"``
    (``final``, ``average`` over every evaluation, ``steps``)."""
    if history is not None and len(history):
        result = {**result, "history": history.summary()}
    # whole or absent: study.py --resume takes an existing eval.json for a finished run
    return write_text_atomic(run_dir / name, json.dumps(result, indent=2) + "\n")
