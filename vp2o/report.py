"""Turn run directories into `report.md` with PNG plots (``vp2o report``).

Each run directory may hold `metrics.jsonl` (written by `vp2o.metrics.MetricsLogger`; RL runs) and
`eval.json` (held-out evaluation)::

    {"held_out_accuracy": 0.62, "pass_at_k": {"1": 0.62, "4": 0.81},
     "mean_response_length": 17.3, "num_prompts": 200}

A run may lack either. A run without RL metrics (the `sft` warm start logs only its loss, or no
`metrics.jsonl` at all) is a baseline: a table row, no diagnostics or plots. The report holds:

1. a results table: `run | held-out accuracy | pass@k ... | mean response length | prompts`, one
   row per run in the order given;
2. routing diagnostics per RL run: the mean over the last `LAST_N` logged steps of router entropy,
   expert-load entropy and max/min, expert overlap, mean |cos| of prototypes, ESS, drift and the
   trust-region distance D; the step acceptance rate; the number of refresh events;
3. plots (PNG next to `report.md`, linked relatively): reward and accuracy, response length,
   expert utilisation per layer (last step's `experts/load`), prototype similarity (last step's
   `prototypes/similarity`), D / ESS / drift trajectories, refresh events.

A key that no run logged drops its column or plot, and the report says so. Plots use matplotlib's
Agg canvas directly (no pyplot, no global backend switch).

    python -m vp2o.report --out runs/demo sft=runs/demo/sft grpo=runs/demo/grpo vp2o=runs/demo/vp2o
    python -m vp2o.report runs/demo        # every sub-directory holding metrics.jsonl/eval.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vp2o.files import write_text_atomic
from vp2o.metrics import METRICS_FILE, read_metrics

__all__ = ["EVAL_FILE", "LAST_N", "REPORT_FILE", "build_parser", "main", "write_report"]

EVAL_FILE = "eval.json"
REPORT_FILE = "report.md"
LAST_N = 10
"""Routing diagnostics average the last this many steps that logged the key."""

DIAGNOSTICS: tuple[tuple[str, str], ...] = (
    ("router/entropy", "router entropy"),
    ("experts/load_entropy", "load entropy"),
    ("experts/load_max_over_min", "load max/min"),
    ("experts/overlap", "expert overlap"),
    ("prototypes/mean_abs_cosine", "mean abs cos"),
    ("behavior/ess", "ESS"),
    ("behavior/drift", "drift"),
    ("trust/anchor_distance", "D"),
)
RL_KEYS = frozenset({"reward/mean", "accuracy", "events/refresh", *(key for key, _ in DIAGNOSTICS)})
"""A run whose metrics.jsonl holds any of these is an RL run (diagnostics and plots)."""
DASH = "—"


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    name: str
    path: Path
    records: list[dict[str, Any]] | None = None
    """metrics.jsonl records; None when the run has none (e.g. the SFT baseline)."""
    eval: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_rl(self) -> bool:
        """Logged RL metrics (an SFT run's metrics.jsonl only has its loss)."""
        return any(key in r for r in self.records or () for key in RL_KEYS)

    def has(self, key: str) -> bool:
        return any(key in r for r in self.records or ())


def _load_run(name: str, path: Path) -> _Run:
    run = _Run(name, Path(path))
    if (run.path / METRICS_FILE).is_file():
        run.records = read_metrics(run.path / METRICS_FILE)
        if not run.is_rl:
            run.notes.append(f"`{METRICS_FILE}` holds no RL metrics (not in diagnostics or plots)")
    eval_path = run.path / EVAL_FILE
    if eval_path.is_file():
        try:
            data = json.loads(eval_path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            run.eval = data
        except ValueError as e:
            run.notes.append(f"`{eval_path}` could not be read ({e})")
    else:
        run.notes.append(f"no `{EVAL_FILE}`")
    return run


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return math.nan  # None (a NaN/inf in the JSONL file) and anything non-numeric


def _series(run: _Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records holding scalar `key`; null -> NaN (a gap in plots)."""
    steps, values = [], []
    for r in run.records or ():
        if key in r and not isinstance(r[key], list):
            steps.append(r.get("step", len(steps)))
            values.append(_number(r[key]))
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _last_matrix(run: _Run, key: str) -> tuple[int, np.ndarray] | None:
    """(step, array) of the last record holding list-valued `key`, nulls as NaN."""
    for r in reversed(run.records or ()):
        value = r.get(key)
        if isinstance(value, list) and value:
            try:
                arr = np.asarray(_nan_nested(value), dtype=float)
            except ValueError:  # ragged
                continue
            return int(r.get("step", -1)), arr
    return None


def _nan_nested(value: Any) -> Any:
    if isinstance(value, list):
        return [_nan_nested(v) for v in value]
    return _number(value)


def _refresh_steps(run: _Run) -> np.ndarray:
    steps, values = _series(run, "events/refresh")
    return steps[values == 1]


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return DASH
    if not math.isfinite(value):
        return DASH
    return format(value, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def _pass_at_k(run: _Run) -> dict[str, Any]:
    value = (run.eval or {}).get("pass_at_k")
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _k_order(k: str) -> tuple[int, float, str]:
    try:
        return (0, float(k), k)
    except ValueError:
        return (1, 0.0, k)


def _results_section(runs: list[_Run]) -> list[str]:
    ks = sorted({k for run in runs for k in _pass_at_k(run)}, key=_k_order)
    has_len = any("mean_response_length" in (run.eval or {}) for run in runs)
    has_n = any("num_prompts" in (run.eval or {}) for run in runs)
    header = ["run", "held-out accuracy", *(f"pass@{k}" for k in ks)]
    header += ["mean response length"] if has_len else []
    header += ["prompts"] if has_n else []
    rows = []
    for run in runs:
        ev = run.eval or {}
        row = [run.name, _fmt(ev.get("held_out_accuracy"), ".3f")]
        row += [_fmt(_pass_at_k(run).get(k), ".3f") for k in ks]
        row += [_fmt(ev.get("mean_response_length"), ".1f")] if has_len else []
        row += (
            [_fmt(ev.get("num_prompts"), "d") if isinstance(ev.get("num_prompts"), int) else DASH]
            if has_n
            else []
        )
        rows.append(row)
    lines = ["## Results", "", *_table(header, rows), ""]
    notes = [f"- `{run.name}`: {note}." for run in runs for note in run.notes]
    if not ks:
        notes.append("- No run's eval.json has `pass_at_k`: pass@k columns skipped.")
    if not has_len:
        notes.append("- No run's eval.json has `mean_response_length`: column skipped.")
    if notes:
        lines += [*notes, ""]
    return lines


def _diagnostics_section(rl: list[_Run]) -> list[str]:
    lines = ["## Routing diagnostics", ""]
    if not rl:
        return [*lines, "_Skipped: no run has RL metrics in a `metrics.jsonl`._", ""]
    keys = [(k, label) for k, label in DIAGNOSTICS if any(run.has(k) for run in rl)]
    missing = [k for k, _ in DIAGNOSTICS if not any(run.has(k) for run in rl)]
    has_accept = any(run.has("trust/accepted") or run.has("trust/accept_rate") for run in rl)
    has_refresh = any(run.has("events/refresh") for run in rl)
    header = ["run", "last step", *(f"{label} (`{k}`)" for k, label in keys)]
    header += ["accept rate"] if has_accept else []
    header += ["refreshes"] if has_refresh else []
    rows = []
    partial: dict[str, list[str]] = {}  # key -> runs that show a dash for it
    starred = False
    for run in rl:
        steps = [r.get("step") for r in run.records or () if isinstance(r.get("step"), int)]
        row = [run.name, str(max(steps)) if steps else DASH]
        for k, _ in keys:
            _, values = _series(run, k)
            window = values[-LAST_N:]
            finite = window[np.isfinite(window)]
            cell = _fmt(float(finite.mean())) if finite.size else DASH
            if finite.size and finite.size < window.size:
                cell += "*"
                starred = True
            row.append(cell)
            if not finite.size:
                partial.setdefault(k, []).append(run.name)
        if has_accept:
            rate = _accept_rate(run)
            row.append(_fmt(rate, ".3f"))
            if rate is None:
                partial.setdefault("trust/accepted", []).append(run.name)
        if has_refresh:
            row.append(str(len(_refresh_steps(run))) if run.has("events/refresh") else DASH)
            if not run.has("events/refresh"):
                partial.setdefault("events/refresh", []).append(run.name)
        rows.append(row)
    lines += [
        f"Mean over the last {LAST_N} steps that logged each key; accept rate is the fraction of "
        "steps whose trust-region check accepted the update (`trust/accepted`, or the last "
        "logged `trust/accept_rate`); refreshes counts steps with `events/refresh == 1`.",
        "",
        *_table(header, rows),
        "",
    ]
    notes = []
    if missing:
        notes.append(
            "- Not logged by any run (columns skipped): "
            + ", ".join(f"`{k}`" for k in missing)
            + "."
        )
    if not has_accept:
        notes.append("- Not logged by any run (column skipped): `trust/accepted`.")
    if not has_refresh:
        notes.append("- Not logged by any run (column skipped): `events/refresh`.")
    if starred:
        notes.append(
            f"- *: some of the last {LAST_N} values were null (NaN or inf logged, e.g. max/min "
            "with an idle expert); the mean is over the finite ones."
        )
    if partial:
        notes.append(
            f"- {DASH}: not logged (or null in all of the last {LAST_N} steps) by the run named: "
            + ", ".join(f"`{k}` ({', '.join(partial[k])})" for k in sorted(partial))
            + "."
        )
    if notes:
        lines += [*notes, ""]
    return lines


def _accept_rate(run: _Run) -> float | None:
    _, rate = _series(run, "trust/accept_rate")
    rate = rate[np.isfinite(rate)]
    if rate.size:
        return float(rate[-1])
    _, accepted = _series(run, "trust/accepted")
    accepted = accepted[np.isfinite(accepted)]
    return float((accepted > 0).mean()) if accepted.size else None


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / name, dpi=100, format="png")
    return name


def _curves(
    axes: Sequence[Any],
    rl: list[_Run],
    keys: Sequence[tuple[str, str]],
    *,
    band: dict[str, str] | None = None,
    refresh: bool = False,
) -> None:
    """One axis per (key, title); every RL run a coloured line; optional ±std band."""
    for ax, (key, title) in zip(axes, keys, strict=True):
        drawn = False
        for i, run in enumerate(rl):
            steps, values = _series(run, key)
            if not steps.size:
                continue
            drawn = True
            ax.plot(steps, values, color=f"C{i}", label=run.name, lw=1.5)
            std_key = (band or {}).get(key)
            if std_key and run.has(std_key):
                s_steps, std = _series(run, std_key)
                if np.array_equal(s_steps, steps):
                    ax.fill_between(steps, values - std, values + std, color=f"C{i}", alpha=0.15)
            if refresh:
                for s in _refresh_steps(run):
                    ax.axvline(s, color=f"C{i}", alpha=0.3, lw=0.8, ls=":")
        ax.set_title(f"{title} ({key})", fontsize=10)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)


def _plot_lines(
    out_dir: Path,
    rl: list[_Run],
    name: str,
    keys: Sequence[tuple[str, str]],
    **kw: Any,
) -> str | None:
    if not any(run.has(k) for run in rl for k, _ in keys):
        return None
    fig = _figure(4.5 * len(keys), 3.4)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    _curves(axes, rl, keys, **kw)
    return _save(fig, out_dir, name)


def _heatmap(
    ax: Any, matrix: np.ndarray, *, cmap: str, vmin: float | None = None, vmax: float | None = None
) -> Any:
    image = ax.imshow(
        matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
    )
    rows, cols = matrix.shape
    if rows <= 16 and cols <= 16:
        for (r, c), v in np.ndenumerate(matrix):
            if math.isfinite(v):
                red, green, blue, _ = image.cmap(image.norm(v))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(
                    c,
                    r,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    return image


def _plot_expert_load(out_dir: Path, run: _Run) -> str | None:
    found = _last_matrix(run, "experts/load")
    if found is None:
        return None
    step, load = found
    load = load.reshape(1, -1) if load.ndim == 1 else load.reshape(load.shape[0], -1)
    fig = _figure(max(4.0, 0.55 * load.shape[1] + 2), max(2.2, 0.5 * load.shape[0] + 1.4))
    ax = fig.subplots()
    image = _heatmap(ax, load, cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax, label="load")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{run.name}: expert utilisation, step {step}", fontsize=10)
    return _save(fig, out_dir, f"expert_load_{_slug(run.name)}.png")


def _plot_similarity(out_dir: Path, run: _Run) -> str | None:
    found = _last_matrix(run, "prototypes/similarity")
    if found is None or found[1].ndim not in (2, 3):
        return None
    step, sim = found
    mats = [sim] if sim.ndim == 2 else list(sim)
    n = len(mats)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    # |u_i.u_j| (what the trainer logs) in [0, 1]; signed cosines in [-1, 1]
    signed = bool(np.nanmin(sim) < 0)
    cmap, vmin = ("coolwarm", -1.0) if signed else ("magma", 0.0)
    fig = _figure(3.6 * cols + 0.8, 3.2 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_axis_off()
            continue
        image = _heatmap(ax, mats[i], cmap=cmap, vmin=vmin, vmax=1.0)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        if n > 1:
            ax.set_title(f"layer {i}", fontsize=9)
    fig.colorbar(image, ax=list(axes[:n]), label="cosine" if signed else "|cosine|")
    fig.suptitle(f"{run.name}: prototype similarity, step {step}", fontsize=10)
    return _save(fig, out_dir, f"prototype_similarity_{_slug(run.name)}.png")


def _plot_refresh(out_dir: Path, rl: list[_Run]) -> str | None:
    logged = [run for run in rl if run.has("events/refresh")]
    if not logged:
        return None
    fig = _figure(9.0, 0.6 * len(logged) + 1.4)
    ax = fig.subplots()
    for i, run in enumerate(rl):
        if run in logged:
            steps, _ = _series(run, "events/refresh")
            ax.hlines(i, steps.min(), steps.max(), color="0.85", lw=6)
            ax.vlines(_refresh_steps(run), i - 0.35, i + 0.35, color=f"C{i}", lw=1.5)
    ax.set_yticks(range(len(rl)), [run.name for run in rl])
    ax.set_ylim(len(rl) - 0.4, -0.6)  # first run on top, as in the tables
    ax.set_xlabel("step")
    ax.set_title("refresh events (events/refresh == 1)", fontsize=10)
    return _save(fig, out_dir, "refresh_events.png")


def _image(title: str, file: str | None, skipped: str) -> list[str]:
    if file is None:
        return [f"### {title}", "", f"_Skipped: {skipped}._", ""]
    return [f"### {title}", "", f"![{title}]({file})", ""]


def _plots_section(out_dir: Path, rl: list[_Run]) -> list[str]:
    lines = ["## Plots", ""]
    if not rl:
        return [*lines, "_Skipped: no run has RL metrics in a `metrics.jsonl`._", ""]
    file = _plot_lines(
        out_dir,
        rl,
        "reward_accuracy.png",
        [("reward/mean", "reward"), ("accuracy", "training accuracy")],
        band={"reward/mean": "reward/std"},
    )
    lines += _image("Reward and accuracy", file, "no run logged `reward/mean` or `accuracy`")
    file = _plot_lines(
        out_dir, rl, "response_length.png", [("response/length_mean", "mean response length")]
    )
    lines += _image("Response length", file, "no run logged `response/length_mean`")

    for title, plot, key in (("Expert utilisation", _plot_expert_load, "experts/load"),
                             ("Prototype similarity", _plot_similarity, "prototypes/similarity")):
        lines += [f"### {title}", ""]
        for run in rl:  # one heatmap per run
            file = plot(out_dir, run)
            lines += (
                [f"![{run.name} {title.lower()}]({file})", ""]
                if file
                else [f"_{run.name}: skipped, no `{key}` matrix logged._", ""]
            )

    file = _plot_lines(
        out_dir,
        rl,
        "trust_ess_drift.png",
        [("trust/anchor_distance", "D"), ("behavior/ess", "ESS"), ("behavior/drift", "drift")],
        refresh=True,
    )
    lines += _image(
        "D, ESS and drift (dotted: refresh events)",
        file,
        "no run logged `trust/anchor_distance`, `behavior/ess` or `behavior/drift`",
    )
    file = _plot_refresh(out_dir, rl)
    lines += _image("Refresh events", file, "no run logged `events/refresh`")
    return lines


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def write_report(out_dir: Path, runs: dict[str, Path]) -> Path:
    """Write `out_dir/report.md` and its PNG plots for `runs` (name -> run directory, in the
    order of the table). Returns the path of `report.md`."""
    if not runs:
        raise ValueError("write_report needs at least one run")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = []
    for name, path in runs.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"run {name!r}: {path} is not a directory")
        loaded.append(_load_run(name, Path(path)))
    rl = [run for run in loaded if run.is_rl]
    lines = ["# vp2o report", ""]
    lines += [f"- `{run.name}`: `{_rel(run.path, out_dir)}`" for run in loaded] + [""]
    lines += _results_section(loaded)
    lines += _diagnostics_section(rl)
    lines += _plots_section(out_dir, rl)
    return write_text_atomic(out_dir / REPORT_FILE, "\n".join(lines).rstrip() + "\n")


def _rel(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # other drive on Windows
        return str(path)


def _is_run_dir(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / EVAL_FILE).is_file()


def _resolve_runs(specs: Sequence[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        p = Path(path if sep else spec)
        if not sep:
            name = p.resolve().name
        if name in runs:
            raise ValueError(f"run name {name!r} given twice")
        runs[name] = p
    if len(specs) == 1 and "=" not in specs[0] and not _is_run_dir(runs[name]):
        parent = runs.pop(name)
        subdirs = [d for d in sorted(parent.iterdir()) if d.is_dir() and _is_run_dir(d)]
        # baselines (e.g. sft: no RL metrics) first, then RL runs; by name within each
        subdirs.sort(key=lambda d: (_load_run(d.name, d).is_rl, d.name))
        runs = {d.name: d for d in subdirs}
    return runs


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``vp2o report`` (added to `parser` when given, e.g. a sub-command's)."""
    parser = parser or argparse.ArgumentParser(
        prog="vp2o report",
        description="Write report.md (results table, routing diagnostics, PNG plots) from run "
        "directories holding metrics.jsonl and/or eval.json.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="NAME=DIR or DIR (named after DIR), table rows in this order; a single DIR that "
        "is not itself a run uses its sub-directories that are (runs without RL metrics, such "
        "as sft, first)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory for report.md and PNGs (default: the single run directory, "
        "the parent directory given, or the runs' common parent)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vp2o.report``: prints the path of report.md."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``vp2o report`` with parsed ``build_parser`` arguments: prints the path of report.md;
    a missing or empty run directory is a one-line error and exit status 2."""
    try:
        runs = _resolve_runs(args.runs)
        if not runs:
            raise ValueError(
                f"no run directories (with {METRICS_FILE} or {EVAL_FILE}) found in {args.runs[0]}"
            )
        if args.out is not None:
            out = Path(args.out)
        elif len(args.runs) == 1:
            out = Path(args.runs[0].partition("=")[2] or args.runs[0])
        else:
            out = Path(os.path.commonpath([str(p.resolve()) for p in runs.values()]))
        path = write_report(out, runs)
    except (OSError, ValueError) as e:
        print(f"vp2o report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
