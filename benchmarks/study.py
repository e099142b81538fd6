"""GRPO vs VP2O on the demo task: one shared SFT warm start, 3 seeds each, the same budget.

    .venv/bin/python benchmarks/study.py                     # runs/study, seeds 1 2 3
    .venv/bin/python benchmarks/study.py --seeds 1 2 3 --out runs/study --steps 300 --arms grpo vp2o

Uses the demo's settings (``vp2o.demo.demo_config``): the tiny MoE (4 layers, d=128, 8 experts,
top-2), SFT warm start (the demo's SFT steps, once, shared), then for each seed GRPO and VP2O for
the same number of learner steps from that checkpoint. The training and held-out rows are written
once to JSONL files (the demo's arithmetic task at the default seed), so a run's seed changes only
its RL randomness (data order, sampling, prototype start), never the data; every run is scored on
the same 1000 held-out prompts (greedy accuracy, pass@k from 8 samples at temperature 1).

Writes ``OUT/study.json`` (every run's numbers), ``OUT/study.md`` (the tables) and plots
(``OUT/study_*.png``). Routing diagnostics are means over each run's last 10 logged steps of
``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

DIAGNOSTICS = {
    "router/entropy": "router entropy",
    "experts/load_entropy": "expert utilisation entropy",
    "experts/overlap": "expert overlap",
    "prototypes/mean_abs_cosine": "mean prototype similarity",
}
ARMS = {
    "grpo": ["algorithm=grpo"],
    "vp2o": ["algorithm=vp2o"],
    # batch reuse: 4 learner steps per rollout batch at most (VP2O's default, with its budgets
    # ending a batch early; GRPO's fixed refresh after 4), against the demo's one step per batch
    "grpo_reuse4": ["algorithm=grpo", "train.updates_per_rollout=4"],
    "vp2o_reuse4": ["algorithm=vp2o", "train.updates_per_rollout=4"],
}


def write_task_files(root: Path) -> tuple[Path, Path]:
    """The demo task's rows (default seed) as train/eval JSONL files, so seeds share the data."""
    from vp2o.data.tasks import load_task
    from vp2o.demo import demo_config

    cfg = demo_config("sft", root)
    task = load_task(cfg.data, seed=cfg.seed)
    paths = root / "train.jsonl", root / "eval.jsonl"
    for path, rows in zip(paths, (task.train, task.eval), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def run_config(arm: str, seed: int, root: Path, steps: int, files: tuple[Path, Path]):
    """One RL run's config: the demo's, with the shared data files, this seed and the arm's
    overrides."""
    from vp2o.demo import demo_config

    algorithm = "vp2o" if arm.startswith("vp2o") else "grpo"
    return demo_config(algorithm, root, [
        *ARMS[arm], f"seed={seed}", f"train.run_dir={root / f'{arm}_seed{seed}'}",
        f"train.steps={steps}", "train.eval_samples=8", "train.wandb_mode=disabled",
        "data.task=jsonl", f"data.train_path={files[0]}", f"data.eval_path={files[1]}",
        "data.tokenizer=sentencepiece",
    ])


def tail_mean(rows: list[dict], key: str, n: int = 10) -> float | None:
    """Mean of the last ``n`` non-null values of ``key``."""
    vals = [r[key] for r in rows if r.get(key) is not None][-n:]
    return sum(vals) / len(vals) if vals else None


def summarise(run_dir: Path, result: dict, seconds: float) -> dict:
    """The numbers of one run, from its result and ``metrics.jsonl``."""
    from vp2o.metrics import read_metrics

    rows = read_metrics(run_dir)
    out = {
        "held_out_accuracy": result["held_out_accuracy"],
        "pass_at_k": result.get("pass_at_k", {}),
        "mean_response_length": result["mean_response_length"],
        "median_solution_tokens": result.get("median_solution_tokens"),
        "rollouts": sum(r.get("events/refresh", 0.0) for r in rows),
        "accepted_steps": sum(r.get("trust/accepted", 1.0) for r in rows),
        "seconds": seconds,
        "curves": {k: [r.get(k) for r in rows] for k in
                   ("accuracy", "response/length_mean", *DIAGNOSTICS)},
    }
    out.update({k: tail_mean(rows, k) for k in DIAGNOSTICS})
    return out


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    """(mean, sample std) of the non-null values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt(ms: tuple[float, float] | None, spec: str = ".3f") -> str:
    """``mean ± std``."""
    return "—" if ms is None else f"{ms[0]:{spec}} ± {ms[1]:{spec}}"


def tables(runs: dict[str, list[dict]], sft: dict) -> str:
    """Markdown tables of the study."""
    ks = sorted({k for rs in runs.values() for r in rs for k in r["pass_at_k"]}, key=int)
    head = ["run", "held-out acc (greedy)", *[f"pass@{k}" for k in ks], "mean resp len",
            "median solution tokens", "rollouts", "accepted steps", "s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| sft (start) | {sft['held_out_accuracy']:.3f} | "
                 + " | ".join(f"{sft.get('pass_at_k', {}).get(k, float('nan')):.3f}" for k in ks)
                 + f" | {sft['mean_response_length']:.2f} | "
                 f"{sft.get('median_solution_tokens')} | — | — | — |")
    for alg, rs in runs.items():
        cells = [alg, fmt(mean_std([r["held_out_accuracy"] for r in rs]))]
        cells += [fmt(mean_std([r["pass_at_k"].get(k) for r in rs])) for k in ks]
        cells += [fmt(mean_std([r["mean_response_length"] for r in rs]), ".2f"),
                  fmt(mean_std([r["median_solution_tokens"] for r in rs]), ".2f"),
                  fmt(mean_std([r["rollouts"] for r in rs]), ".1f"),
                  fmt(mean_std([r["accepted_steps"] for r in rs]), ".1f"),
                  fmt(mean_std([r["seconds"] for r in rs]), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| run | " + " | ".join(DIAGNOSTICS.values()) + " |",
              "|---|" + "---|" * len(DIAGNOSTICS)]
    for alg, rs in runs.items():
        lines.append(f"| {alg} | " + " | ".join(
            fmt(mean_std([r[k] for r in rs]), ".4f") for k in DIAGNOSTICS) + " |")
    lines += ["", "Per seed (held-out accuracy): " + "; ".join(
        f"{alg} " + ", ".join(f"{r['held_out_accuracy']:.3f}" for r in rs)
        for alg, rs in runs.items())]
    return "\n".join(lines) + "\n"


def plots(runs: dict[str, list[dict]], out: Path) -> list[str]:
    """Curves (mean over seeds, band = min..max) and the final held-out accuracy per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    keys = ["accuracy", "response/length_mean", *DIAGNOSTICS]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, key in zip(axes.flat, keys, strict=True):
        for alg, rs in runs.items():
            curves = [np.array([np.nan if v is None else v for v in r["curves"][key]], float)
                      for r in rs]
            n = min(len(c) for c in curves)
            arr = np.stack([c[:n] for c in curves])
            # rollout keys are logged only on refresh steps: carry the last value forward
            for row in arr:
                for i in range(1, n):
                    if np.isnan(row[i]):
                        row[i] = row[i - 1]
            x = np.arange(n)
            ax.plot(x, np.nanmean(arr, 0), label=alg)
            ax.fill_between(x, np.nanmin(arr, 0), np.nanmax(arr, 0), alpha=0.2)
        ax.set_title(DIAGNOSTICS.get(key, key))
        ax.set_xlabel("learner step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "study_curves.png", dpi=90)
    plt.close(fig)
    files.append("study_curves.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (alg, rs) in enumerate(runs.items()):
        accs = [r["held_out_accuracy"] for r in rs]
        ax.scatter([i] * len(accs), accs, label=alg)
        ax.errorbar([i + 0.1], [statistics.fmean(accs)],
                    yerr=[statistics.stdev(accs) if len(accs) > 1 else 0], fmt="k_", capsize=6)
    ax.set_xticks(range(len(runs)), list(runs))
    ax.set_ylabel("held-out accuracy (greedy)")
    fig.tight_layout()
    fig.savefig(out / "study_accuracy.png", dpi=90)
    plt.close(fig)
    files.append("study_accuracy.png")
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=None,
                    help="learner steps per RL run (budget; default: the demo's)")
    ap.add_argument("--arms", nargs="+", default=["grpo", "vp2o"], choices=list(ARMS))
    args = ap.parse_args()

    from vp2o.console import quiet_third_party_warnings
    from vp2o.demo import demo_config
    from vp2o.sft import sft
    from vp2o.train import train

    quiet_third_party_warnings()
    root = Path(args.out)
    if args.steps is None:
        args.steps = demo_config("grpo", root).train.steps
    t0 = time.perf_counter()
    sft_dir = root / "sft"
    if (sft_dir / "eval.json").exists() and (sft_dir / "checkpoints").exists():
        sft_result = json.loads((sft_dir / "eval.json").read_text())
    else:
        sft_result = sft(demo_config("sft", root, ["train.eval_samples=8",
                                                   "train.wandb_mode=disabled"]))
    print(f"== sft: held-out accuracy {sft_result['held_out_accuracy']:.3f}", flush=True)
    files = write_task_files(root)
    runs: dict[str, list[dict]] = {a: [] for a in args.arms}
    for seed in args.seeds:
        for alg in args.arms:  # alternate, so all arms see the same machine load
            cfg = run_config(alg, seed, root, args.steps, files)
            run_dir = Path(cfg.train.run_dir)
            done = run_dir / "study_run.json"
            if done.exists():  # finished by an earlier invocation: reuse it
                result, seconds = json.loads(done.read_text())
            else:
                t = time.perf_counter()
                result = train(cfg)
                seconds = time.perf_counter() - t
                done.write_text(json.dumps([result, seconds]))
            summary = summarise(run_dir, result, seconds)
            runs[alg].append({"seed": seed, **summary})
            print(f"== {alg} seed {seed}: held-out accuracy {summary['held_out_accuracy']:.3f} "
                  f"({summary['seconds']:.0f}s)", flush=True)
    (root / "study.json").write_text(json.dumps({"sft": sft_result, "runs": runs}, indent=1))
    text = tables(runs, sft_result)
    pngs = plots(runs, root)
    (root / "study.md").write_text(text + "\n" + "".join(f"![]({p})\n" for p in pngs))
    print(text)
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {root / 'study.md'}")


if __name__ == "__main__":
    main()
