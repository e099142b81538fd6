"""The GRPO-vs-VP2O study: every arm, several seeds, two tasks, the same budget per run.

    .venv/bin/python benchmarks/study.py --quick --out runs/study_quick   # the reduced version
    .venv/bin/python benchmarks/study.py --out runs/study                 # the full study (hours)
    .venv/bin/python benchmarks/study.py --out runs/study --resume        # continue it
    .venv/bin/python benchmarks/study.py --out runs/study --report-only   # tables from the runs
    .venv/bin/python benchmarks/study.py --tasks skills --arms grpo vp2o vp2o_clip --seeds 1 2 3

Protocol. For each task (``data.task``: ``arith``, ``skills``) and seed, one supervised warm
start (``vp2o sft`` with the demo's settings, ``examples/vp2o/configs/demo_sft.yaml``, at that
seed) is shared by every arm of that seed; each arm (``vp2o.arms``: grpo, vp2o,
vp2o_no_transport, vp2o_no_specialisation, vp2o_clip) then trains from it with the demo's RL
settings (``shared/demo_rl.yaml``) and the arm's overrides, at that seed, for the same number of
rollout batches (``train.steps``), evaluating every ``train.eval_every`` steps and at the end.
The seed sets the task's rows (training and held-out prompts), the initialisation, the data
order and the sampling; arms of one seed differ only in their overrides, so the study compares
them per seed (paired differences against GRPO with a percentile-bootstrap 95% interval of their
mean over seeds).

Every run is a subprocess of the real CLI (``vp2o sft`` / ``vp2o train --config FILE
key=value ...``): a crash costs that run, which the report lists as failed, not the study.
Each run's output goes to ``OUT/<task>/seed<s>/<arm>/`` (``sft`` for the warm start) with its
console log (``log.txt``) and ``run.json`` (command, exit status, seconds). ``--resume`` keeps
the runs whose ``eval.json`` exists and reruns the others from scratch (without it every run is
rerun: its folder is emptied first).

Writes ``OUT/study.json`` (every run's numbers: final and average-over-evaluations held-out
metrics, learning curves) and ``OUT/study.md``: per task, mean +- sample std over seeds per arm
of the final and the average-over-evaluations accuracy, pass@k, response length, generated
tokens and wall time; the paired differences arm - grpo; per-skill accuracy and the routing
specialisation (skill-expert mutual information, expert-utilisation entropy per layer) where the
evaluation reports them; learning curves (``OUT/study_<task>.png``: held-out accuracy and
training reward against generated tokens and against wall-clock seconds).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "vp2o" / "configs"
sys.path.insert(0, str(REPO))  # run from a source checkout without installing

from vp2o.arms import ARMS, BASELINE, arm_overrides  # noqa: E402

TASKS: dict[str, list[str]] = {
    "arith": ["data.task=arith"],
    # answers of 8-12 characters: up to 13 response tokens with EOS (vp2o.data.skills)
    "skills": ["data.task=skills", "rollout.max_new_tokens=16"],
}
"""Task name -> the overrides that select it (on top of the demo's settings)."""

FULL = {
    "seeds": [1, 2, 3, 4, 5],
    "arms": list(ARMS),
    "sft": [],  # demo_sft.yaml as it is
    "rl": ["train.eval_every=50"],  # demo_rl.yaml as it is: 300 rollout batches of 64 x 8
    "eval": ["train.eval_samples=8"],
}
"""The full study's settings (overrides on top of the demo's files)."""

QUICK = {
    "seeds": [1, 2],
    "arms": ["grpo", "vp2o", "vp2o_clip"],
    "sft": ["sft.steps=150"],
    "rl": ["train.steps=12", "rollout.prompts_per_step=16", "train.eval_every=6"],
    "eval": ["train.eval_samples=4", "data.num_eval_prompts=200"],
}
"""``--quick``: a smoke version of the study (minutes, not hours; its numbers mean little)."""

PASS_KS = ("1", "4", "8")


# ------------------------------------------------------------------------------ statistics
def mean_std(values: Sequence[float | None]) -> tuple[float, float, int] | None:
    """(mean, sample standard deviation, n) of the non-null values; std 0 for one value."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linear between order statistics (numpy's
    default ``linear`` method: position ``q * (n - 1)``)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values``.

    Draws ``resamples`` samples of ``len(values)`` values with replacement (``random.Random(seed)``,
    so the interval is reproducible), takes each sample's mean, and returns the ``(1 - level) / 2``
    and ``(1 + level) / 2`` quantiles of those means (:func:`percentile`). All values equal: that
    value twice. With few values (5 seeds) the interval is rough: it cannot be wider than the
    range of the values and undercovers; read it with the per-seed values beside it.

    Raises:
        ValueError: no values, or ``level`` outside (0, 1).
    """
    if not values:
        raise ValueError("bootstrap of no values")
    if not 0 < level < 1:
        raise ValueError(f"level = {level}: expected 0 < level < 1")
    vals = [float(v) for v in values]
    n = len(vals)
    rng = random.Random(seed)
    means = sorted(sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return percentile(means, (1 - level) / 2), percentile(means, (1 + level) / 2)


def paired_differences(runs: list[dict], metric: Callable[[dict], float | None], *,
                       baseline: str = BASELINE, level: float = 0.95) -> dict[str, dict]:
    """Per arm, the per-seed differences ``metric(arm run) - metric(baseline run)`` over the seeds
    where both runs finished, their mean and its bootstrap interval.

    Args:
        runs: run records of one task (``task``, ``seed``, ``arm``, ``status``, ...).
        metric: a run record -> a number (None: not available; that seed is left out).

    Returns:
        ``{arm: {"per_seed": {seed: diff}, "mean": float | None, "ci": [lo, hi] | None,
        "n": int, "wins": int, "losses": int}}`` for every arm but the baseline.
    """
    by = {(r["arm"], r["seed"]): r for r in runs if r.get("status") == "ok"}
    arms = sorted({r["arm"] for r in runs} - {baseline, "sft"}, key=_arm_order)
    out = {}
    for arm in arms:
        diffs = {}
        for (a, seed), r in sorted(by.items(), key=lambda kv: kv[0][1]):
            base = by.get((baseline, seed))
            if a != arm or base is None:
                continue
            x, y = metric(r), metric(base)
            if x is not None and y is not None:
                diffs[seed] = x - y
        d = list(diffs.values())
        out[arm] = {
            "per_seed": diffs, "n": len(d),
            "mean": statistics.fmean(d) if d else None,
            "ci": list(bootstrap_ci(d, level=level)) if d else None,
            "wins": sum(v > 0 for v in d), "losses": sum(v < 0 for v in d),
        }
    return out


def _arm_order(arm: str) -> tuple[int, str]:
    order = ["sft", *ARMS]
    return (order.index(arm) if arm in order else len(order), arm)


# ------------------------------------------------------------------------------ reading runs
def eval_numbers(result: dict) -> dict[str, float]:
    """One evaluation as flat numbers under the evaluation's key names (``accuracy``,
    ``pass@k``, ``response_len``, ``skill/<name>/accuracy``, ``routing/...``); the older names
    (``held_out_accuracy``, ``pass_at_k: {k: v}``, ``mean_response_length``) are read as those."""
    renamed = {"held_out_accuracy": "accuracy", "mean_response_length": "response_len"}
    out: dict[str, float] = {}
    older: dict[str, float] = {}  # used where the current name is absent
    for key, value in result.items():
        if key == "pass_at_k" and isinstance(value, dict):
            older.update({f"pass@{k}": float(v) for k, v in value.items()
                          if isinstance(v, int | float) and not isinstance(v, bool)})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if key in renamed:
                older[renamed[key]] = float(value)
            else:
                out[key] = float(value)
    return {**older, **out}


def _average(evals: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for e in evals for k in e}
    return {k: statistics.fmean(e[k] for e in evals if k in e) for k in sorted(keys)}


def _cumulative(rows: list[dict], total: str, per_step: str) -> list[float]:
    """``total`` (a cumulative metric) per row, else the running sum of ``per_step``."""
    if any(total in r for r in rows):
        out, last = [], 0.0
        for r in rows:
            last = r[total] if r.get(total) is not None else last
            out.append(float(last))
        return out
    return list(itertools.accumulate(float(r.get(per_step) or 0.0) for r in rows))


def read_run(run_dir: Path) -> dict:
    """The numbers of one finished run: ``final`` and ``average`` (over all evaluations, the
    final one included) held-out metrics, ``evals`` (how many), and the curves from
    ``metrics.jsonl``: per step ``generated_tokens`` and ``wall_s`` (cumulative; from
    ``progress/*`` when logged, else summed from ``perf/generated_tokens`` / ``perf/step_s``),
    ``reward`` (``reward/mean``), and the evaluation points ``eval_step``, ``eval_tokens``,
    ``eval_wall_s``, ``eval_accuracy`` (the final evaluation last).

    ``eval.json``'s own summaries (``history``: ``final``, ``average``, ``steps``, written by
    ``vp2o.evaluate.write_eval``) are used when it has them; otherwise
    the final evaluation is ``eval.json`` and the average is over the ``eval/*`` lines of
    ``metrics.jsonl`` and the final one.
    """
    from vp2o.metrics import read_metrics

    result = json.loads((run_dir / "eval.json").read_text())
    summary = result.get("history", result)  # vp2o.evaluate.write_eval(history=...)
    final = eval_numbers(summary["final"] if isinstance(summary.get("final"), dict) and
                         summary["final"] else result)
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    rows = [r for r in rows if "loss/sft" not in r]  # an SFT run's lines are no RL curve
    tokens = _cumulative(rows, "progress/generated_tokens", "perf/generated_tokens")
    wall = _cumulative(rows, "progress/wall_s", "perf/step_s")
    evals, points = [], []
    for i, r in enumerate(rows):
        e = eval_numbers({k[5:]: v for k, v in r.items() if k.startswith("eval/")})
        if e:
            evals.append(e)
            points.append((r["step"] + 1, tokens[i], wall[i], e.get("accuracy")))
    evals.append(final)
    if rows:
        points.append((rows[-1]["step"] + 1, tokens[-1], wall[-1], final.get("accuracy")))
    if isinstance(summary.get("average"), dict) and summary["average"]:
        average = eval_numbers(summary["average"])
        n_evals = len(summary["steps"]) if isinstance(summary.get("steps"), list) else len(evals)
    else:
        average, n_evals = _average(evals), len(evals)
    return {
        "final": final, "average": average, "evals": n_evals,
        "curves": {
            "step": [r["step"] + 1 for r in rows], "generated_tokens": tokens, "wall_s": wall,
            "reward": [r.get("reward/mean") for r in rows],
            "eval_step": [p[0] for p in points], "eval_tokens": [p[1] for p in points],
            "eval_wall_s": [p[2] for p in points], "eval_accuracy": [p[3] for p in points],
        },
    }


# ------------------------------------------------------------------------------ the report
def _fmt(ms: tuple[float, float, int] | None, spec: str = ".3f") -> str:
    return "—" if ms is None else f"{ms[0]:{spec}} ± {ms[1]:{spec}}"


def _signed(x: float | None, spec: str = "+.3f") -> str:
    return "—" if x is None else f"{x:{spec}}"


def _layer_keys(runs: list[dict], prefix: str) -> list[str]:
    keys = {k for r in runs if r.get("status") == "ok" for k in r["final"] if k.startswith(prefix)}
    return sorted(keys, key=lambda k: int(re.sub(r"\D", "", k.rsplit("/", 1)[-1]) or 0))


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]


def task_tables(task: str, runs: list[dict]) -> str:
    """The markdown of one task: results, paired differences, per-skill accuracy, routing."""
    ok = [r for r in runs if r.get("status") == "ok"]
    arms = sorted({r["arm"] for r in runs}, key=_arm_order)
    ks = [k for k in PASS_KS if any(f"pass@{k}" in r["final"] for r in ok)]

    def stat(arm: str, get: Callable[[dict], float | None], spec: str = ".3f") -> str:
        return _fmt(mean_std([get(r) for r in ok if r["arm"] == arm]), spec)

    def tail(r: dict, key: str) -> float | None:
        v = r["curves"][key]
        return v[-1] if v else None

    lines = [f"## Task `{task}`", ""]
    head = ["arm", "runs ok", "final acc", "average acc", *[f"pass@{k}" for k in ks],
            "resp len", "generated tokens", "train s"]
    rows = []
    for arm in arms:
        n_all = sum(r["arm"] == arm for r in runs)
        n_ok = sum(r["arm"] == arm for r in ok)
        rows.append([
            arm, f"{n_ok}/{n_all}",
            stat(arm, lambda r: r["final"].get("accuracy")),
            "—" if arm == "sft" else stat(arm, lambda r: r["average"].get("accuracy")),
            *[stat(arm, lambda r, k=k: r["final"].get(f"pass@{k}")) for k in ks],
            stat(arm, lambda r: r["final"].get("response_len"), ".1f"),
            "—" if arm == "sft" else stat(arm, lambda r: tail(r, "generated_tokens"), ".3g"),
            "—" if arm == "sft" else stat(arm, lambda r: tail(r, "wall_s"), ".0f"),
        ])
    lines += ["Held-out metrics, mean ± sample std over seeds (final checkpoint; \"average\": "
              "over every evaluation of the run, the final one included). `sft` is the shared "
              "warm start of each seed.", "", *_table(head, rows), ""]

    metrics = {"final acc": lambda r: r["final"].get("accuracy"),
               "average acc": lambda r: r["average"].get("accuracy")}
    metrics.update({f"pass@{k}": (lambda r, k=k: r["final"].get(f"pass@{k}")) for k in ks})
    diffs = {name: paired_differences(runs, fn) for name, fn in metrics.items()}
    first = diffs["final acc"]
    if first:
        head = ["arm − grpo", "seeds", *[f"Δ {m} [95% CI]" for m in metrics],
                "wins/losses (final acc)", "per seed Δ final acc"]
        rows = []
        for arm in first:
            cells = [arm, str(first[arm]["n"])]
            for name in metrics:
                d = diffs[name][arm]
                ci = d["ci"]
                cells.append("—" if d["mean"] is None else
                             f"{_signed(d['mean'])} [{_signed(ci[0])}, {_signed(ci[1])}]")
            cells.append(f"{first[arm]['wins']}/{first[arm]['losses']}")
            cells.append(", ".join(f"{s}: {_signed(v)}" for s, v in first[arm]["per_seed"].items())
                         or "—")
            rows.append(cells)
        lines += ["Paired by seed: each arm's run minus GRPO's run of the same seed (same warm "
                  "start, same data); mean over seeds and a percentile-bootstrap 95% interval "
                  "of that mean (10,000 resamples of the seeds).", "", *_table(head, rows), ""]

    skills = sorted({k.split("/")[1] for r in ok for k in r["final"]
                     if k.startswith("skill/") and k.endswith("/accuracy")})
    if skills:
        rows = [[arm, *[stat(arm, lambda r, s=s: r["final"].get(f"skill/{s}/accuracy"))
                        for s in skills]] for arm in arms]
        lines += ["Per-skill held-out accuracy (final checkpoint), mean ± std over seeds.", "",
                  *_table(["arm", *skills], rows), ""]
    routing = [("routing/mi_skill_expert/", "MI(skill; expert)"),
               ("routing/expert_entropy/", "expert entropy")]
    for prefix, name in routing:
        keys = _layer_keys(runs, prefix)
        if not keys:
            continue

        def layer_mean(r: dict, keys: list[str] = keys) -> float | None:
            vals = [r["final"][k] for k in keys if k in r["final"]]
            return statistics.fmean(vals) if vals else None

        rows = [[arm, stat(arm, layer_mean, ".4f"),
                 *[stat(arm, lambda r, k=k: r["final"].get(k), ".4f") for k in keys]]
                for arm in arms]
        lines += [f"{name} per layer, normalised to [0, 1] (final checkpoint), mean ± std over "
                  "seeds.", "", *_table(["arm", "mean over layers",
                                         *[k.rsplit("/", 1)[-1] for k in keys]], rows), ""]
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed:
        lines += ["Failed or missing runs (left out above):", ""]
        lines += [f"- {r['arm']} seed {r['seed']}: {r.get('status')}: {r.get('error', '')}"
                  for r in failed]
        lines.append("")
    return "\n".join(lines)


def report(study: dict) -> str:
    """``study.md``: the settings, then each task's tables and curves."""
    s = study["settings"]
    lines = [
        "# GRPO vs VP2O study", "",
        f"Command: `{study['command']}`  ",
        f"Date: {study['date']}; machine: {study['machine']}; commit: {study['commit']}  ",
        f"Seeds {s['seeds']}; arms {', '.join(s['arms'])}; tasks {', '.join(s['tasks'])}"
        f"{' (--quick)' if s['quick'] else ''}  ",
        f"SFT overrides: `{' '.join(s['sft']) or '(demo_sft.yaml)'}`; RL overrides: "
        f"`{' '.join(s['rl']) or '(demo_rl.yaml)'}`; evaluation: `{' '.join(s['eval'])}`"
        + (f"; every run: `{' '.join(s['extra'])}`" if s.get("extra") else ""), "",
    ]
    for task in s["tasks"]:
        runs = [r for r in study["runs"] if r["task"] == task]
        lines.append(task_tables(task, runs))
        if study.get("plots", {}).get(task):
            lines += [f"![learning curves, task {task}]({study['plots'][task]})", ""]
    return "\n".join(lines)


def _aligned(runs: list[dict], xkey: str, ykey: str):
    """Per index: mean x, mean / min / max y over the runs (index-aligned: every run of an arm
    has the same steps); None where no run has a value."""
    series = [(r["curves"][xkey], r["curves"][ykey]) for r in runs]
    n = min((len(x) for x, _ in series), default=0)
    xs, mean, lo, hi = [], [], [], []
    for i in range(n):
        ys = [y[i] for _, y in series if y[i] is not None]
        if not ys:
            continue
        xs.append(statistics.fmean(x[i] for x, _ in series))
        mean.append(statistics.fmean(ys))
        lo.append(min(ys))
        hi.append(max(ys))
    return xs, mean, lo, hi


def _smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_task(task: str, runs: list[dict], path: Path) -> None:
    """Held-out accuracy (evaluations, the SFT start at 0) and training reward against
    generated tokens and against wall-clock seconds: per arm the mean over seeds, band min..max."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in runs if r.get("status") == "ok" and r["arm"] != "sft"]
    sft = {r["seed"]: r["final"].get("accuracy") for r in runs
           if r["arm"] == "sft" and r.get("status") == "ok"}
    fig = Figure(figsize=(12, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [(0, 0, "eval_tokens", "eval_accuracy", "held-out accuracy", "generated tokens"),
              (0, 1, "eval_wall_s", "eval_accuracy", "held-out accuracy", "training seconds"),
              (1, 0, "generated_tokens", "reward", "training reward (mean)", "generated tokens"),
              (1, 1, "wall_s", "reward", "training reward (mean)", "training seconds")]
    for row, col, xkey, ykey, ylabel, xlabel in panels:
        ax = axes[row][col]
        for arm in sorted({r["arm"] for r in ok}, key=_arm_order):
            mine = [r for r in ok if r["arm"] == arm]
            if ykey == "eval_accuracy":  # the warm start of the run's seed first, at 0
                mine = [{"curves": {xkey: [0.0, *r["curves"][xkey]],
                                    ykey: [sft.get(r["seed"]), *r["curves"][ykey]]}}
                        for r in mine]
            xs, mean, lo, hi = _aligned(mine, xkey, ykey)
            if ykey == "reward":
                w = max(1, len(mean) // 25)
                mean, lo, hi = _smooth(mean, w), _smooth(lo, w), _smooth(hi, w)
            if xs:
                line = ax.plot(xs, mean, label=arm, marker="o" if ykey == "eval_accuracy"
                               else None, markersize=3)[0]
                ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"task {task}: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_outputs(study: dict, out: Path) -> Path:
    """``study.json``, the plots and ``study.md`` in ``out``; returns the ``study.md`` path."""
    out.mkdir(parents=True, exist_ok=True)
    study["plots"] = {}
    for task in study["settings"]["tasks"]:
        runs = [r for r in study["runs"] if r["task"] == task]
        if any(r.get("status") == "ok" and r["arm"] != "sft" for r in runs):
            name = f"study_{task}.png"
            plot_task(task, runs, out / name)
            study["plots"][task] = name
    (out / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    path = out / "study.md"
    path.write_text(report(study))
    return path


# ------------------------------------------------------------------------------ running
def cli() -> list[str]:
    """The ``vp2o`` command of this interpreter's environment."""
    script = Path(sys.executable).parent / "vp2o"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vp2o.cli"]


def plan_runs(out: Path, tasks: list[str], seeds: list[int], arms: list[str],
              settings: dict, extra: list[str]) -> list[dict]:
    """Every run of the study in the order they run (per seed and task: the warm start, then
    the arms), each ``{"task", "seed", "arm", "dir", "loop", "config", "overrides"}``."""
    runs = []
    for seed, task in itertools.product(seeds, tasks):  # seed by seed: a cut-short study
        # still has every task and arm of its first seeds
        base = out / task / f"seed{seed}"
        common = [*TASKS[task], f"seed={seed}", "train.wandb_mode=disabled", *settings["eval"]]
        sft_dir = base / "sft"
        runs.append({"task": task, "seed": seed, "arm": "sft", "dir": str(sft_dir),
                     "loop": "sft", "config": str(CONFIGS / "demo_sft.yaml"),
                     "overrides": [*common, *settings["sft"], f"train.run_dir={sft_dir}",
                                   *extra]})
        for arm in arms:
            runs.append({
                "task": task, "seed": seed, "arm": arm, "dir": str(base / arm), "loop": "train",
                "config": str(CONFIGS / "shared" / "demo_rl.yaml"),
                "overrides": [*common, *settings["rl"], *arm_overrides(arm),
                              f"train.run_dir={base / arm}", "train.resume=never",
                              f"train.init_checkpoint={sft_dir / 'checkpoints'}",
                              f"data.tokenizer_path={sft_dir / 'tokenizer.model'}", *extra],
            })
    return runs


def check_config(run: dict) -> str | None:
    """The config error of a planned run (loaded as its subprocess will load it), or None."""
    from vp2o.config import ConfigError, load_config

    try:
        load_config(run["config"], run["overrides"], loop=run["loop"])
    except ConfigError as e:
        return str(e)
    return None


def launch(run: dict, timeout: float | None) -> dict:
    """Run one ``vp2o sft|train`` subprocess into ``run["dir"]`` (emptied first); returns
    ``{"returncode", "seconds", "command"}`` (also written to ``run.json``)."""
    run_dir = Path(run["dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = [*cli(), run["loop"], "--config", run["config"], *run["overrides"]]
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        try:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    status = {"returncode": rc, "seconds": time.perf_counter() - t0, "command": command}
    (run_dir / "run.json").write_text(json.dumps(status, indent=1) + "\n")
    return status


def _log_tail(run_dir: Path, n: int = 3) -> str:
    path = run_dir / "log.txt"
    if not path.exists():
        return ""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[-400:]


def collect(run: dict) -> dict:
    """The study record of a planned run from its folder (``status`` ok, failed or missing)."""
    rec = {k: run[k] for k in ("task", "seed", "arm", "dir")}
    run_dir = Path(run["dir"])
    status = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() \
        else {}
    rec["seconds"] = status.get("seconds")
    if run.get("error"):
        return {**rec, "status": "failed", "error": run["error"]}
    if not (run_dir / "eval.json").exists():
        why = (f"exit status {status['returncode']}: {_log_tail(run_dir)}" if status
               else "not run")
        return {**rec, "status": "failed" if status else "missing", "error": why}
    try:
        return {**rec, "status": "ok", **read_run(run_dir)}
    except (ValueError, KeyError, OSError) as e:
        return {**rec, "status": "failed", "error": f"unreadable output: {e}"}


def machine() -> str:
    """A line naming the machine (CPU model, cores, torch) for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "?"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch_version}, load average " \
           f"{os.getloadavg()[0]:.1f} at the end"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return out + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default runs/study, with "
                    "--quick runs/study_quick)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--arms", nargs="+", default=None, choices=list(ARMS),
                    help=f"default: all ({', '.join(ARMS)}); --quick: {' '.join(QUICK['arms'])}")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="default 1 2 3 4 5; --quick: 1 2")
    ap.add_argument("--quick", action="store_true", help="the reduced study (minutes)")
    ap.add_argument("--resume", action="store_true",
                    help="keep runs whose eval.json exists (a warm start also needs its "
                         "checkpoint); rerun the others")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: tables and plots from the runs in --out")
    ap.add_argument("--run-timeout", type=float, default=None,
                    help="seconds one run may take before it is stopped and counted as failed")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                    metavar="KEY=VALUE",
                    help="extra overrides for every run, after the study's own (e.g. --set "
                         "train.steps=100 sft.steps=300)")
    return ap


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    seeds = args.seeds or settings["seeds"]
    arms = args.arms or settings["arms"]
    if BASELINE not in arms:
        print(f"study: note: without the {BASELINE} arm there are no paired differences")
    out = Path(args.out or ("runs/study_quick" if args.quick else "runs/study")).resolve()
    runs = plan_runs(out, args.tasks, seeds, arms, settings, args.overrides)
    t0 = time.perf_counter()
    if not args.report_only:
        checked: dict[tuple, str | None] = {}
        for run in runs:  # a config error fails its runs now, before any subprocess
            key = (run["task"], run["arm"])
            if key not in checked:
                checked[key] = check_config(run)
                if checked[key]:
                    print(f"study: {run['task']}/{run['arm']}: config error, its runs are "
                          f"skipped: {checked[key]}", flush=True)
            run["error"] = checked[key]
        failed_sft: set[tuple] = set()
        for run in runs:
            name = f"{run['task']}/seed{run['seed']}/{run['arm']}"
            run_dir = Path(run["dir"])
            if run["error"]:
                continue
            if (run["task"], run["seed"]) in failed_sft:
                run["error"] = "its warm start (sft) failed"
                continue
            done = (run_dir / "eval.json").exists() and (
                run["arm"] != "sft" or (run_dir / "checkpoints").exists())
            if args.resume and done:
                print(f"study: {name}: done earlier, kept", flush=True)
                continue
            status = launch(run, args.run_timeout)
            rec = collect(run)
            acc = rec.get("final", {}).get("accuracy")
            print(f"study: {name}: {rec['status']} in {status['seconds']:.0f}s"
                  + (f", held-out accuracy {acc:.3f}" if acc is not None else "")
                  + (f" ({rec['error']})" if rec["status"] != "ok" else "")
                  + f" [{time.perf_counter() - t0:.0f}s]", flush=True)
            if run["arm"] == "sft" and rec["status"] != "ok":
                failed_sft.add((run["task"], run["seed"]))
    study = {
        "command": " ".join(["benchmarks/study.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "commit": commit(),
        "seconds": time.perf_counter() - t0,
        "settings": {**settings, "seeds": seeds, "arms": arms, "tasks": args.tasks,
                     "quick": args.quick, "extra": args.overrides},
        "runs": [collect(run) for run in runs],
    }
    path = write_outputs(study, out)
    print(report(study))
    print(f"study: wrote {path} ({study['seconds']:.0f}s)")
    return path


if __name__ == "__main__":
    main()
