"""vp2o.metrics: JSONL records, tensor conversion, NaN -> null, resume truncation, wandb modes."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vp2o.metrics import CONSOLE_KEYS, MetricsLogger, format_console, read_metrics, to_python


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    """No wandb banner, git probing, code saving or console capture in tests."""
    for key, value in {
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(key, value)


def _logger(run_dir: Path, **kw) -> MetricsLogger:
    kw.setdefault("wandb_mode", "disabled")
    kw.setdefault("stream", io.StringIO())
    return MetricsLogger(run_dir, config={"seed": 0}, run_name="t", **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_flushed_json_line_per_step(tmp_path):
    lg = _logger(tmp_path / "run")
    lg.log(0, {"reward/mean": 0.25, "accuracy": 0.5})
    lg.log(1, {"reward/mean": 0.5, "accuracy": 0.75, "events/refresh": 1})
    # flushed every line: readable before close
    assert _lines(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 0, "reward/mean": 0.25, "accuracy": 0.5},
        {"step": 1, "reward/mean": 0.5, "accuracy": 0.75, "events/refresh": 1},
    ]
    lg.close()
    lg.close()  # idempotent
    with pytest.raises(RuntimeError):
        lg.log(2, {})


def test_nan_and_inf_are_null(tmp_path):
    with _logger(tmp_path) as lg:
        lg.log(
            3,
            {
                "a": math.nan,
                "b": math.inf,
                "c": -math.inf,
                "m": [[1.0, math.nan], [math.inf, 2.0]],
                "t": torch.tensor(float("nan")),
                "tm": torch.tensor([1.0, float("-inf")]),
            },
        )
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (record,) = read_metrics(tmp_path)
    assert record == {
        "step": 3,
        "a": None,
        "b": None,
        "c": None,
        "m": [[1.0, None], [None, 2.0]],
        "t": None,
        "tm": [1.0, None],
    }


def test_tensor_conversion():
    out = to_python(
        {
            "f": torch.tensor(0.3),  # float32: shortest round-trip decimal
            "d": torch.tensor(0.1, dtype=torch.float64),
            "h": torch.tensor(0.5, dtype=torch.bfloat16),
            "i": torch.tensor(7),
            "b": torch.tensor(True),
            "mat": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
            "imat": torch.arange(4).reshape(2, 2),
            "cube": torch.zeros(2, 1, 2),
            "list": [torch.tensor(1.5), 2, [torch.tensor(3)]],
            "np": np.float32(0.25),
            "nparr": np.array([[1, 2]]),
            "nested": {"x": torch.tensor(2.0)},
            "py": 4,
        }
    )
    assert out == {
        "f": 0.3,
        "d": 0.1,
        "h": 0.5,
        "i": 7,
        "b": 1,
        "mat": [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]],
        "imat": [[0, 1], [2, 3]],
        "cube": [[[0.0, 0.0]], [[0.0, 0.0]]],
        "list": [1.5, 2, [3]],
        "np": 0.25,
        "nparr": [[1, 2]],
        "nested/x": 2.0,
        "py": 4,
    }
    assert type(out["f"]) is float and type(out["i"]) is int
    assert type(out["mat"][0][0]) is float and type(out["imat"][0][0]) is int


def test_grad_tensors_are_detached(tmp_path):
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with _logger(tmp_path) as lg:
        out = lg.log(0, {"loss/policy": (x * 2).sum(), "v": x * 1})
    assert out == {"loss/policy": 6.0, "v": [1.0, 2.0]}


def test_truncate_after_on_resume(tmp_path):
    with _logger(tmp_path) as lg:
        for s in range(6):
            lg.log(s, {"x": float(s)})
    # the run crashed after step 5, its last checkpoint was at step 3: resume at 3
    with _logger(tmp_path) as lg:
        assert lg.truncate_after(3) == 3
        for s in range(3, 8):
            lg.log(s, {"x": 10.0 + s})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(8))
    assert [r["x"] for r in records] == [0.0, 1.0, 2.0, 13.0, 14.0, 15.0, 16.0, 17.0]
    # the constructor argument does the same
    with _logger(tmp_path, resume_step=5) as lg:
        lg.log(5, {"x": -1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
    assert read_metrics(tmp_path)[-1]["x"] == -1.0


def test_truncate_after_while_open_and_without_file(tmp_path):
    with _logger(tmp_path) as lg:
        assert lg.truncate_after(0) == 0  # nothing yet
        lg.log(0, {"x": 0.0})
        lg.log(1, {"x": 1.0})
        lg.truncate_after(1)  # the open handle is closed and re-opened
        lg.log(1, {"x": 2.0})
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path)] == [(0, 0.0), (1, 2.0)]


def test_append_after_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step":0,"x":1.0}\n{"step":1,"x"')  # killed mid-write
    with _logger(tmp_path) as lg:
        lg.log(1, {"x": 2.0})
    assert _lines(path) == [{"step": 0, "x": 1.0}, {"step": 1, "x": 2.0}]


def test_read_metrics_tolerates_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step":0,"x":1.0}\n{"step":1,"x":null}\n{"step":2,"x":0.')
    assert read_metrics(path) == [{"step": 0, "x": 1.0}, {"step": 1, "x": None}]
    path.write_text('{"step":0}\n\n{"step":1}\n\n')
    assert read_metrics(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step":0}\n{"ste\n{"step":2}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


def test_step_is_reserved(tmp_path):
    with _logger(tmp_path) as lg, pytest.raises(ValueError, match="reserved"):
        lg.log(0, {"step": 1})


def test_console_line(tmp_path):
    stream = io.StringIO()
    with _logger(tmp_path, stream=stream, console_every=2) as lg:
        for s in range(4):
            lg.log(
                s,
                {
                    "reward/mean": torch.tensor(0.53125),
                    "kl/k3": 1.5e-5,
                    "behavior/ess": 0.9,
                    "trust/accepted": True,
                    "perf/step_s": 1.25,
                    "experts/load": [[1.0, 2.0]],
                    "not/shown": 3.0,
                },
            )
    lines = stream.getvalue().splitlines()
    assert lines == [
        f"step {s} | reward 0.5312 | kl 1.50e-05 | accepted 1 | ess 0.9 | s/step 1.25"
        for s in (0, 2)
    ]
    assert format_console(7, {}) == "step 7"
    assert {label for _, label in CONSOLE_KEYS} >= {"reward", "acc", "loss", "kl", "D", "ess"}


def test_not_main_writes_nothing(tmp_path):
    stream = io.StringIO()
    lg = _logger(tmp_path / "run", is_main=False, wandb_mode="offline", stream=stream)
    assert lg.log(0, {"x": torch.tensor(1.0)}) == {}
    lg.truncate_after(0)
    lg.close()
    assert not (tmp_path / "run").exists() and stream.getvalue() == ""


def test_disabled_mode_has_no_wandb_dir(tmp_path):
    with _logger(tmp_path, wandb_mode="disabled") as lg:
        lg.log(0, {"x": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_wandb_failure_falls_back_to_disabled(tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="wandb.init failed.*no network"):
        lg = _logger(tmp_path, wandb_mode="online")
    assert lg.wandb_mode == "disabled"
    lg.log(0, {"x": 1.0})
    lg.close()
    assert read_metrics(tmp_path) == [{"step": 0, "x": 1.0}]


def test_wandb_log_failure_falls_back_to_disabled(tmp_path):
    class BrokenRun:
        finished = False

        def log(self, data, step):
            raise OSError("disk full")

        def finish(self):
            self.finished = True

    lg = _logger(tmp_path)
    lg._wandb_run = run = BrokenRun()
    with pytest.warns(RuntimeWarning, match="wandb.log failed.*disk full"):
        lg.log(0, {"x": 1.0})
    assert run.finished and lg.wandb_mode == "disabled"
    lg.log(1, {"x": 2.0})  # no second warning, no crash
    lg.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


def test_wandb_init_arguments_and_run_id_reuse(tmp_path, monkeypatch):
    import wandb

    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def fake_init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    with _logger(tmp_path, wandb_mode="offline", wandb_project="p") as lg:
        lg.log(2, {"x": 0.0})
        lg.log(4, {"x": torch.tensor(1.0), "m": [[1.0, math.nan]], "b": True, "n": math.nan})
    with _logger(tmp_path, wandb_mode="online", resume_step=3):  # a resumed run: keeps step 2
        pass
    with _logger(tmp_path, wandb_mode="offline", resume_step=0):  # a fresh start, same dir
        pass
    first, second, fresh = (c[1] for c in calls if c[0] == "init")
    assert first["mode"] == "offline" and second["mode"] == "online"
    assert first["dir"] == str(tmp_path) and first["project"] == "p" and first["name"] == "t"
    assert first["config"] == {"seed": 0} and first["resume"] == "allow"
    assert first["id"] == second["id"] != fresh["id"]
    assert fresh["id"] == (tmp_path / "wandb_id").read_text().strip()
    _, step, data = calls[2]
    assert step == 4 and data["x"] == 1.0 and data["b"] == 1 and math.isnan(data["n"])
    assert isinstance(data["m"], wandb.Histogram)


@pytest.mark.timeout(120)
def test_wandb_offline_run_directory(tmp_path):
    """One real offline wandb run (the slow part of this file): the run directory exists and
    its .wandb file holds the logged keys."""
    run_dir = tmp_path / "run"
    with _logger(run_dir, wandb_mode="offline") as lg:
        assert lg.wandb_mode == "offline"
        for s in range(3):
            lg.log(
                s,
                {
                    "reward/mean": torch.tensor(0.5 + s),
                    "behavior/ess": math.nan,
                    "experts/load": torch.rand(2, 4),
                },
            )
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].is_dir()
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert offline[0].name.endswith(run_id)
    (data_file,) = offline[0].glob(f"run-{run_id}.wandb")
    # wandb's service process may still be writing the file when finish() returns
    deadline = time.monotonic() + 60
    while b"experts/load" not in (data := data_file.read_bytes()):
        assert time.monotonic() < deadline, f"{data_file} has no logged data ({len(data)} B)"
        time.sleep(0.1)
    assert b"reward/mean" in data and b"behavior/ess" in data
    assert len(read_metrics(run_dir)) == 3


def test_the_wandb_run_is_continued_on_resume_only(tmp_path, monkeypatch):
    """Which wandb run a logger writes to follows `resume_step`, not what `metrics.jsonl` holds:
    a checkpoint is written before its step's metrics line, so a run resumed from it may have no
    line to keep (it used to start a new wandb run), and an old folder's lines are not the history
    of a new run (it used to continue the old wandb run)."""
    import wandb

    ids = []

    class FakeRun:
        def log(self, data, step):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: ids.append(kw["id"]) or FakeRun())
    with _logger(tmp_path, wandb_mode="offline", resume_step=0):
        pass  # killed after the checkpoint of step 1, before the metrics line of step 0
    with _logger(tmp_path, wandb_mode="offline", resume_step=1) as lg:  # resumed from step 1
        lg.log(1, {"x": 1.0})
    with _logger(tmp_path, wandb_mode="offline", resume_step=0):  # a new run, same folder
        pass
    with _logger(tmp_path, wandb_mode="offline") as lg:  # a new run that keeps the file
        lg.log(0, {"x": 2.0})
    assert ids[0] == ids[1] and len(set(ids)) == 3
    assert (tmp_path / "wandb_id").read_text().strip() == ids[3]


@pytest.mark.timeout(180)
def test_wandb_offline_resume_continues_the_run(tmp_path):
    """Real offline wandb: the run resumed from a checkpoint newer than its last metrics line
    writes to the same wandb run id (wandb sync merges the two offline folders into one run)."""
    run_dir = tmp_path / "run"
    with _logger(run_dir, wandb_mode="offline", resume_step=0) as lg:
        first = lg._wandb_run.id  # killed before the metrics line of step 0, checkpoint at 1
    with _logger(run_dir, wandb_mode="offline", resume_step=1) as lg:
        assert lg._wandb_run.id == first
        lg.log(1, {"reward/mean": 0.5})
    assert (run_dir / "wandb_id").read_text().strip() == first
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with "-1" added when both started in the same second
    assert len(offline) == 2 and all(f"-{first}" in d.name for d in offline), offline
