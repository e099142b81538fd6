"""vp2o.report on synthetic run directories: the table, the diagnostics, the plots, missing keys."""

from __future__ import annotations

import json
import math
import random
import struct
import zlib
from pathlib import Path

import pytest

from vp2o.report import main, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS, EXPERTS, STEPS = 3, 6, 12


def _write_metrics(run_dir: Path, records: list[dict], *, partial_tail: bool = False) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 99, "rew' if partial_tail else ""))


def _write_eval(run_dir: Path, acc: float, p1: float, p4: float, length: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(
        json.dumps(
            {
                "held_out_accuracy": acc,
                "pass_at_k": {"1": p1, "4": p4},
                "mean_response_length": length,
                "num_prompts": 64,
            }
        )
    )


def _rl_records(vp2o: bool, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for s in range(STEPS):
        r = {
            "step": s,
            "reward/mean": 0.3 + 0.04 * s,
            "reward/std": 0.2,
            "accuracy": 0.25 + 0.04 * s,
            "response/length_mean": 10.0 + s,
            "router/entropy": 1.5,
            "experts/load": [[rng.random() for _ in range(EXPERTS)] for _ in range(LAYERS)],
            "experts/load_entropy": 1.7,
            "experts/load_max_over_min": 2.0 + s,  # last 10 steps: 4..13 -> mean 8.5
            "experts/overlap": 0.25,
            "behavior/ess": 0.9 if s != 5 else None,  # a NaN logged as null
            "behavior/drift": 0.01 * (s % 4),
            "events/refresh": 1.0 if s % 4 == 0 else 0.0,
            "perf/step_s": 0.5,
        }
        if vp2o:
            r.update(
                {
                    "prototypes/mean_abs_cosine": 0.125,
                    "prototypes/similarity": [
                        [1.0 if i == j else rng.uniform(-1, 1) for j in range(EXPERTS)]
                        for i in range(EXPERTS)
                    ],
                    "trust/anchor_distance": 0.02,
                    "trust/accepted": 0.0 if s in (3, 7, 11) else 1.0,
                }
            )
        records.append(r)
    return records


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, (path, len(data))
    # IHDR: a real image of sensible size
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 200 <= width <= 4000 and 100 <= height <= 4000, (path, width, height)
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]


def _table(text: str, heading: str) -> list[list[str]]:
    lines = text.split(f"## {heading}\n", 1)[1].splitlines()
    end = next((i for i, ln in enumerate(lines) if ln.startswith("|")), 0)
    rows = []
    for ln in lines[end:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split(" | ")])
    return rows


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    root = tmp_path / "demo"
    sft, grpo, vp2o = root / "sft", root / "grpo", root / "vp2o"
    _write_eval(sft, 0.3125, 0.3125, 0.5, 11.25)
    _write_metrics(sft, [{"step": s, "loss/sft": 2.0 - 0.1 * s} for s in range(5)])  # no RL keys
    _write_eval(grpo, 0.5, 0.5, 0.671875, 12.5)
    _write_metrics(grpo, _rl_records(vp2o=False, seed=1))
    _write_eval(vp2o, 0.5625, 0.5625, 0.75, 13.0)
    _write_metrics(vp2o, _rl_records(vp2o=True, seed=2), partial_tail=True)
    return {"sft": sft, "grpo": grpo, "vp2o": vp2o}


def test_report_table_diagnostics_and_plots(tmp_path, runs):
    out = tmp_path / "demo"
    path = write_report(out, runs)
    assert path == out / "report.md"
    text = path.read_text()
    assert text.startswith("# vp2o report")

    # the results table comes first, rows in the given order, values formatted
    first_table = next(ln for ln in text.splitlines() if ln.startswith("|"))
    assert first_table == (
        "| run | held-out accuracy | pass@1 | pass@4 | mean response length | prompts |"
    )
    results = _table(text, "Results")
    assert results[1] == ["---"] * 6
    assert results[2:] == [
        ["sft", "0.312", "0.312", "0.500", "11.2", "64"],
        ["grpo", "0.500", "0.500", "0.672", "12.5", "64"],
        ["vp2o", "0.562", "0.562", "0.750", "13.0", "64"],
    ]

    # routing diagnostics: RL runs only (sft's metrics.jsonl holds only its loss)
    assert text.index("## Results") < text.index("## Routing diagnostics") < text.index("## Plots")
    diag = _table(text, "Routing diagnostics")
    header = diag[0]
    assert header[:2] == ["run", "last step"]
    assert header[-2:] == ["accept rate", "refreshes"]
    col = {name: i for i, name in enumerate(header)}
    rows = {row[0]: row for row in diag[2:]}
    assert list(rows) == ["grpo", "vp2o"]
    g, v = rows["grpo"], rows["vp2o"]
    assert g[col["last step"]] == v[col["last step"]] == str(STEPS - 1)
    assert g[col["router entropy (`router/entropy`)"]] == "1.5"
    assert g[col["load max/min (`experts/load_max_over_min`)"]] == "8.5"
    assert v[col["ESS (`behavior/ess`)"]] == "0.9*"  # the null step is skipped, and marked
    assert "- *: some of the last 10 values were null" in text
    assert g[col["mean abs cos (`prototypes/mean_abs_cosine`)"]] == "—"  # not logged by GRPO
    assert v[col["mean abs cos (`prototypes/mean_abs_cosine`)"]] == "0.125"
    assert v[col["D (`trust/anchor_distance`)"]] == "0.02"
    assert g[col["accept rate"]] == "—" and v[col["accept rate"]] == "0.750"
    assert g[col["refreshes"]] == v[col["refreshes"]] == "3"
    assert "not logged (or null in all of the last 10 steps) by the run named" in text
    assert "`prototypes/mean_abs_cosine` (grpo)" in text and "(vp2o)" not in text

    # plots: PNGs next to report.md, linked relatively, valid images
    expected = [
        "reward_accuracy.png",
        "response_length.png",
        "expert_load_grpo.png",
        "expert_load_vp2o.png",
        "prototype_similarity_vp2o.png",
        "trust_ess_drift.png",
        "refresh_events.png",
    ]
    for name in expected:
        assert f"]({name})" in text, name
        _assert_png(out / name)
    assert not (out / "expert_load_sft.png").exists()
    assert "_grpo: skipped, no `prototypes/similarity` matrix logged._" in text
    assert "`sft`: `metrics.jsonl` holds no RL metrics" in text


def test_missing_keys_and_files_are_reported(tmp_path):
    bare = tmp_path / "bare"  # RL metrics with only reward: most plots and columns skipped
    _write_metrics(bare, [{"step": s, "reward/mean": 0.1 * s} for s in range(4)])
    noeval = tmp_path / "noeval"
    _write_metrics(noeval, [{"step": 0, "reward/mean": math.pi, "experts/load": [1.0, 3.0]}])
    only_acc = tmp_path / "only_acc"
    only_acc.mkdir()
    (only_acc / "eval.json").write_text(json.dumps({"held_out_accuracy": 0.25}))
    out = tmp_path / "out"
    text = write_report(out, {"only_acc": only_acc, "bare": bare, "noeval": noeval}).read_text()

    assert next(ln for ln in text.splitlines() if ln.startswith("|")) == (
        "| run | held-out accuracy |"
    )
    assert _table(text, "Results")[2:] == [["only_acc", "0.250"], ["bare", "—"], ["noeval", "—"]]
    assert "`bare`: no `eval.json`" in text and "pass@k columns skipped" in text
    assert "`mean_response_length`: column skipped" in text
    assert "Not logged by any run (columns skipped): `router/entropy`" in text
    assert "Not logged by any run (column skipped): `events/refresh`" in text
    assert "_Skipped: no run logged `response/length_mean`._" in text
    assert "_Skipped: no run logged `events/refresh`._" in text
    assert "_bare: skipped, no `experts/load` matrix logged._" in text
    _assert_png(out / "reward_accuracy.png")
    _assert_png(out / "expert_load_noeval.png")  # a 1-D load is one row
    assert not (out / "response_length.png").exists()
    assert not (out / "refresh_events.png").exists()
    assert sorted(p.name for p in out.glob("*.png")) == [
        "expert_load_noeval.png",
        "reward_accuracy.png",
    ]


def test_cli_discovers_runs_in_a_parent_directory(tmp_path, runs, capsys):
    root = runs["sft"].parent
    assert main([str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root / "report.md")
    rows = _table((root / "report.md").read_text(), "Results")
    assert [r[0] for r in rows[2:]] == ["sft", "grpo", "vp2o"]  # baseline first

    out = tmp_path / "named"
    assert main(["--out", str(out), f"b={runs['vp2o']}", f"a={runs['sft']}"]) == 0
    assert [r[0] for r in _table((out / "report.md").read_text(), "Results")[2:]] == ["b", "a"]
    assert main([str(tmp_path / "missing")]) == 2
    assert "vp2o report:" in capsys.readouterr().err


def test_the_vp2o_command_takes_the_same_arguments(tmp_path, runs, capsys):
    """``vp2o report`` is ``python -m vp2o.report`` (it used to take DIRs only, require --out
    and end a missing directory in a traceback)."""
    from vp2o.cli import main as cli_main

    root = runs["sft"].parent
    assert cli_main(["report", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root / "report.md")
    out = tmp_path / "named"
    assert cli_main(["report", "--out", str(out), f"b={runs['vp2o']}"]) == 0
    assert [r[0] for r in _table((out / "report.md").read_text(), "Results")[2:]] == ["b"]
    missing = tmp_path / "missing"
    assert cli_main(["report", str(missing), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("vp2o report: ")
