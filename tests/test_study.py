"""benchmarks/study.py without training: the bootstrap against a brute-force bootstrap, the paired
differences by hand, and the report built from synthetic run folders (metrics.jsonl, eval.json,
a failed run)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import statistics
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"
_spec = importlib.util.spec_from_file_location("study", PATH)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ statistics
def test_percentile_is_numpys_linear_quantile():
    rng = random.Random(3)
    for n in (1, 2, 5, 17):
        vals = sorted(rng.uniform(-1, 1) for _ in range(n))
        for q in (0.0, 0.025, 0.1, 0.5, 0.9, 0.975, 1.0):
            assert study.percentile(vals, q) == pytest.approx(np.quantile(vals, q), abs=1e-12)


def test_bootstrap_of_equal_values_is_that_value():
    assert study.bootstrap_ci([0.03] * 5) == pytest.approx((0.03, 0.03))
    assert study.bootstrap_ci([-0.2]) == pytest.approx((-0.2, -0.2))


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [0.0, 0.0, 1.0, 3.0]])
def test_bootstrap_matches_the_exact_bootstrap_distribution(values):
    """Every one of the n^n equally likely resamples enumerated: the exact distribution of the
    resampled mean. The Monte Carlo interval's ends are that distribution's quantiles (the
    smallest mean whose cumulative probability reaches q), for levels whose quantiles are not at
    a jump of the distribution function."""
    n = len(values)
    means = sorted(Fraction(sum(c), n) for c in itertools.product(
        [Fraction(v) for v in values], repeat=n))
    total = len(means)

    def exact_quantile(q: float) -> Fraction:
        for i, m in enumerate(means):
            if (i + 1) / total >= q and (i + 1 == total or means[i + 1] != m):
                return m
        return means[-1]

    checked = 0
    for level in (0.5, 0.8):
        qs = ((1 - level) / 2, (1 + level) / 2)
        cdf = [(i + 1) / total for i in range(total) if i + 1 == total or means[i + 1] != means[i]]
        if any(abs(c - q) < 0.02 for c in cdf for q in qs):
            continue  # the quantile sits on a jump: Monte Carlo may land on either side
        lo, hi = study.bootstrap_ci(values, level=level, resamples=20_000, seed=1)
        assert (lo, hi) == pytest.approx((float(exact_quantile(qs[0])),
                                          float(exact_quantile(qs[1]))))
        checked += 1
    assert checked


def test_bootstrap_is_reproducible_and_inside_the_range():
    vals = [0.05, -0.01, 0.02, 0.04, 0.0]
    a = study.bootstrap_ci(vals, seed=7)
    assert a == study.bootstrap_ci(vals, seed=7)
    assert min(vals) <= a[0] <= statistics.fmean(vals) <= a[1] <= max(vals)
    with pytest.raises(ValueError, match="no values"):
        study.bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        study.bootstrap_ci(vals, level=1.0)


def test_paired_differences_pair_by_seed_and_skip_failed_or_unpaired_runs():
    def run(arm, seed, acc, status="ok"):
        return {"task": "t", "arm": arm, "seed": seed, "status": status,
                "final": {"accuracy": acc}}

    runs = [run("sft", 1, 0.1), run("grpo", 1, 0.5), run("grpo", 2, 0.6), run("grpo", 3, 0.7),
            run("vp2o", 1, 0.55), run("vp2o", 2, 0.6), run("vp2o", 3, 0.65),
            run("vp2o", 4, 0.9),  # no grpo run of seed 4
            run("vp2o_clip", 1, 0.7), run("vp2o_clip", 2, None, status="failed")]
    got = study.paired_differences(runs, lambda r: r["final"].get("accuracy"))
    assert list(got) == ["vp2o", "vp2o_clip"]
    v = got["vp2o"]
    assert v["per_seed"] == pytest.approx({1: 0.05, 2: 0.0, 3: -0.05})
    assert (v["n"], v["wins"], v["losses"]) == (3, 1, 1)
    assert v["mean"] == pytest.approx(0.0)
    assert v["ci"][0] < 0 < v["ci"][1]
    c = got["vp2o_clip"]
    assert c["per_seed"] == pytest.approx({1: 0.2}) and c["ci"] == pytest.approx([0.2, 0.2])


def test_eval_numbers_reads_current_and_older_names():
    got = study.eval_numbers({"held_out_accuracy": 0.5, "pass_at_k": {"1": 0.4, "4": 0.6},
                              "mean_response_length": 9.0, "pass@4": 0.65, "response_len": 8.0,
                              "skill/add/accuracy": 0.25, "num_prompts": 10,
                              "median_solution_tokens": None, "benchmark": "x"})
    assert got == {"accuracy": 0.5, "pass@1": 0.4, "pass@4": 0.65, "response_len": 8.0,
                   "skill/add/accuracy": 0.25, "num_prompts": 10.0}


# ------------------------------------------------------------------------------ synthetic runs
SKILLS = ("add", "rev")
STEPS, EVAL_EVERY = 6, 2


def _acc(arm: str, seed: int) -> float:
    return {"sft": 0.30, "grpo": 0.40, "vp2o": 0.45}[arm] + 0.01 * seed


def _eval(acc: float, layers: int = 2) -> dict:
    out = {"held_out_accuracy": acc, "pass_at_k": {"1": acc - 0.1, "4": acc + 0.1},
           "pass@1": acc - 0.1, "pass@4": acc + 0.1, "response_len": 12.0,
           "num_prompts": 50, "skill/add/accuracy": acc + 0.05, "skill/rev/accuracy": acc - 0.05}
    for i in range(layers):
        out[f"routing/mi_skill_expert/layer{i}"] = 0.1 * (i + 1)
        out[f"routing/expert_entropy/layer{i}"] = 0.5 + 0.1 * i
    return out


def _write_run(run_dir: Path, arm: str, seed: int, *, progress: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    acc = _acc(arm, seed)
    (run_dir / "eval.json").write_text(json.dumps(_eval(acc)))
    (run_dir / "run.json").write_text(json.dumps({"returncode": 0, "seconds": 10.0}))
    lines = []
    if arm == "sft":
        lines = [{"step": s, "loss/sft": 1.0 / (s + 1)} for s in range(3)]
    else:
        for s in range(STEPS):
            r = {"step": s, "reward/mean": 0.1 * s, "perf/generated_tokens": 100.0,
                 "perf/step_s": 2.0}
            if progress:
                r.update({"progress/generated_tokens": 100.0 * (s + 1),
                          "progress/wall_s": 2.0 * (s + 1)})
            if (s + 1) % EVAL_EVERY == 0 and s + 1 < STEPS:
                r["eval/held_out_accuracy"] = acc - 0.02 * (STEPS - s - 1)
            lines.append(r)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_read_run_final_average_and_curves(tmp_path):
    _write_run(tmp_path / "a", "grpo", 1)
    got = study.read_run(tmp_path / "a")
    acc = _acc("grpo", 1)
    assert got["final"]["accuracy"] == pytest.approx(acc)
    # evaluations after steps 2 and 4 (acc - 0.08, acc - 0.04) and the final one (acc)
    assert got["evals"] == 3
    assert got["average"]["accuracy"] == pytest.approx(acc - 0.04)
    c = got["curves"]
    assert c["eval_step"] == [2, 4, 6]
    assert c["eval_tokens"] == [200.0, 400.0, 600.0]
    assert c["eval_wall_s"] == [4.0, 8.0, 12.0]
    assert c["generated_tokens"][-1] == 600.0
    # without progress/* keys the per-step numbers are summed
    _write_run(tmp_path / "b", "grpo", 1, progress=False)
    assert study.read_run(tmp_path / "b")["curves"] == c
    # eval.json's own summaries win (vp2o.evaluate.write_eval with a history)
    summary = {"final": _eval(0.7), "average": _eval(0.6), "steps": [2, 4, 6, 8]}
    (tmp_path / "a" / "eval.json").write_text(json.dumps({**_eval(0.7), "history": summary}))
    got = study.read_run(tmp_path / "a")
    assert (got["final"]["accuracy"], got["average"]["accuracy"], got["evals"]) == (0.7, 0.6, 4)


def test_report_from_synthetic_runs(tmp_path, capsys):
    """A study folder as the runs would leave it: task skills, seeds 1-3, arms grpo and vp2o,
    vp2o_clip failing on every seed (seed 3: never started); then ``--report-only``."""
    out = tmp_path / "study"
    for seed in (1, 2, 3):
        base = out / "skills" / f"seed{seed}"
        for arm in ("sft", "grpo", "vp2o"):
            _write_run(base / arm, arm, seed)
        if seed < 3:
            (base / "vp2o_clip").mkdir()
            (base / "vp2o_clip" / "run.json").write_text(json.dumps({"returncode": 1,
                                                                     "seconds": 3.0}))
            (base / "vp2o_clip" / "log.txt").write_text("Traceback\nRuntimeError: boom\n")
    path = study.main(["--report-only", "--out", str(out), "--tasks", "skills",
                       "--seeds", "1", "2", "3", "--arms", "grpo", "vp2o", "vp2o_clip"])
    text = path.read_text()
    assert text == (out / "study.md").read_text()
    accs = {a: [_acc(a, s) for s in (1, 2, 3)] for a in ("sft", "grpo", "vp2o")}

    def row(arm):
        return next(ln for ln in text.splitlines() if ln.startswith(f"| {arm} |"))

    # results table: mean ± sample std over the 3 seeds, runs ok
    for arm in ("sft", "grpo", "vp2o"):
        m, s = statistics.fmean(accs[arm]), statistics.stdev(accs[arm])
        assert row(arm).startswith(f"| {arm} | 3/3 | {m:.3f} ± {s:.3f} |"), row(arm)
    assert row("vp2o_clip").startswith("| vp2o_clip | 0/3 | — |")
    # paired differences: vp2o - grpo = +0.05 on every seed, so the interval is that value
    paired = next(ln for ln in text.splitlines() if ln.startswith("| vp2o | 3 | +0.050"))
    assert "+0.050 [+0.050, +0.050]" in paired and "3/0" in paired
    assert "1: +0.050, 2: +0.050, 3: +0.050" in paired
    assert "| vp2o_clip | 0 | — |" in text
    # per-skill and routing tables
    assert "| arm | add | rev |" in text
    m = statistics.fmean(a + 0.05 for a in accs["vp2o"])
    assert any(ln.startswith(f"| vp2o | {m:.3f} ± ") for ln in text.splitlines())
    assert "MI(skill; expert)" in text and "| arm | mean over layers | layer0 | layer1 |" in text
    assert "| grpo | 0.1500 ± 0.0000 | 0.1000 ± 0.0000 | 0.2000 ± 0.0000 |" in text
    # the failed runs with their reason
    assert "- vp2o_clip seed 1: failed: exit status 1: Traceback / RuntimeError: boom" in text
    assert "- vp2o_clip seed 3: missing: not run" in text
    # study.json and the plot
    data = json.loads((out / "study.json").read_text())
    assert len(data["runs"]) == 12 and data["plots"] == {"skills": "study_skills.png"}
    ok = [r for r in data["runs"] if r["status"] == "ok"]
    assert len(ok) == 9 and all(math.isfinite(r["final"]["accuracy"]) for r in ok)
    png = (out / "study_skills.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    assert "study: wrote" in capsys.readouterr().out


def test_plan_shares_one_warm_start_per_task_and_seed(tmp_path):
    runs = study.plan_runs(tmp_path, ["arith", "skills"], [1, 2], ["grpo", "vp2o"],
                           study.QUICK, ["x.y=1"])
    assert [(r["task"], r["seed"], r["arm"]) for r in runs[:3]] == [
        ("arith", 1, "sft"), ("arith", 1, "grpo"), ("arith", 1, "vp2o")]
    assert len(runs) == 12
    for r in runs:
        assert f"seed={r['seed']}" in r["overrides"] and r["overrides"][-1] == "x.y=1"
        assert f"data.task={r['task']}" in r["overrides"]
        if r["arm"] != "sft":
            sft = tmp_path / r["task"] / f"seed{r['seed']}" / "sft"
            assert f"train.init_checkpoint={sft / 'checkpoints'}" in r["overrides"]
            assert f"algorithm={'grpo' if r['arm'] == 'grpo' else 'vp2o'}" in r["overrides"]


@pytest.mark.slow
def test_the_real_script_at_a_tiny_size(tmp_path):
    """benchmarks/study.py itself (its --quick takes longer than the suite's budget): one task,
    one seed, a warm start and one arm of the tiny model, each run a real ``vp2o`` subprocess,
    and the report. (That the arms consume the same budget: tests/e2e/test_train.py.)"""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_train import TINY

    out = tmp_path / "study"
    study.main(["--quick", "--out", str(out), "--tasks", "arith", "--seeds", "3",
                "--arms", "vp2o", "--set", *TINY, "sft.steps=3", "train.steps=2",
                "train.eval_every=1", "data.num_eval_prompts=8"])
    data = json.loads((out / "study.json").read_text())
    runs = {r["arm"]: r for r in data["runs"]}
    assert {a: r["status"] for a, r in runs.items()} == {"sft": "ok", "vp2o": "ok"}, data["runs"]
    vp2o = runs["vp2o"]
    assert vp2o["evals"] == 2  # after step 1 and the final one
    assert vp2o["curves"]["eval_step"] == [1, 2]
    rows = [json.loads(ln) for ln in (out / "arith" / "seed3" / "vp2o" / "metrics.jsonl")
            .read_text().splitlines()]
    assert rows[-1]["progress/samples"] == 2 * 4 * 4  # steps x prompts x group (TINY)
    assert rows[-1]["progress/prompts"] == 2 * 4
    text = (out / "study.md").read_text()
    assert "| sft | 1/1 |" in text and "| vp2o | 1/1 |" in text
    assert (out / "study_arith.png").read_bytes()[:8] == PNG_MAGIC
