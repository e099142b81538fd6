"""benchmarks/bench_check.py at a toy size, run as users run it (two trainer subprocesses): both
ways of VP2O's post-update check take the same decisions, and the contract line is printed. The
default invocation is a benchmark (docs/benchmarks.md), not a test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tiny_train import TINY

REPO = Path(__file__).resolve().parents[1]


def test_both_ways_decide_alike_and_the_ratio_line_is_printed():
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_check.py"), "--config", "",
           "--rounds", "1", "--steps", "5", "--updates", "3",
           "--set", *TINY, "algorithm=vp2o", "optimizer.lr=1e-4"]  # mixed accept/reject here
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = dict(re.findall(r"round 0 +(own-forward|next-forward): .*?(updates/batch .*)$",
                           done.stdout, flags=re.MULTILINE))
    assert set(runs) == {"own-forward", "next-forward"}, done.stdout
    # updates per batch and accepted fraction: the same decisions both ways
    strip = re.compile(r", discarded backwards \d+")
    assert strip.sub("", runs["own-forward"]) == strip.sub("", runs["next-forward"]), runs
    assert not runs["own-forward"].startswith("updates/batch 1.00"), runs  # batches went on
    assert re.search(r"^step time ratio next-forward/own-forward: \d+\.\d{3}$", done.stdout,
                     flags=re.MULTILINE), done.stdout
