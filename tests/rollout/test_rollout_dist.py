"""Generation with expert parallelism 2 (torchrun, gloo) equals one process, and does not hang
when the ranks' own rows finish after different numbers of steps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import dist_generate_worker as worker
import pytest
import torch
from torchrun import launcher, worker_env

pytestmark = pytest.mark.slow

WORKER = Path(worker.__file__)




def test_ep2_generation_equals_single_process(tmp_path, init_parallel):
    out = tmp_path / "ep2.pt"
    cmd = [*launcher(2), str(WORKER), "--ep", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=worker_env())

    # Meanwhile, the single-process reference (EP = 1, same weights, same seeds).
    cfg = worker.config(1)
    groups = init_parallel(cfg)
    model = worker.build(cfg, groups)
    single = [worker.run_set(model, i) for i in range(len(worker.PROMPT_SETS))]

    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail("EP=2 generation hung:\n" + stderr[-3000:])
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    multi = torch.load(out)

    # Left alone, the ranks would have run different numbers of decode steps.
    steps = [int(r["response_mask"].sum(-1).max()) for r in single]
    assert steps[0] != steps[1], f"both prompt sets need {steps[0]} steps: change the seeds"
    for want, got in zip(single, multi, strict=True):
        for name in (
            "tokens",
            "position_ids",
            "valid",
            "response_mask",
            "routing_ids",
            "truncated",
        ):
            assert torch.equal(got[name], want[name]), name
        for name in ("behavior_logprobs", "routing_gates"):
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)
