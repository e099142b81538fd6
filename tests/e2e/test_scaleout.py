"""Scale-out through the real entry points, on the CPU over gloo.

- 4 processes, EP=2 (dense DP=4, expert-DP=2), started from the same SFT checkpoint, give the
  single process's first rollout batch and first-step loss. Prompts and sampling are
  layout-independent (``PromptStream`` hands rank r global indices ``position * W + r``; each
  prompt samples from a generator seeded by (seed, step, global index)), so the union over
  ranks of the first batch is the single-process batch.
  What is compared for the loss: at the first step the learner is the actor, so the ratio is 1
  and the token_mean loss is ``-sum_i A_i |y_i| / sum_i |y_i|``. The single process's logged
  loss must equal that formula over the *union* of the 4 ranks' batches (dumped by
  tests/reliability/train_hooks.py), and so must rank 0's: every rank
  divides by the global token count / 4 (so the gradient averaged over ranks is the global one),
  and the logged loss is the mean of the ranks' losses, with the batch statistics (reward,
  accuracy, length, entropy) gathered over the ranks the same way.
- TP=2 x EP=2 is not run: megatron-core does not allow it on the CPU (MoE with TP > 1 needs
  sequence parallelism, which its torch norms refuse; tests/mcore/test_model.py checks both the
  megatron assertion and our named error), and the rollout loop refuses TP > 1 (docs/scaling.md).
- SIGUSR1 to ``python -m vp2o.launch`` (torchrun forwarding the signal, as under SLURM) writes a
  checkpoint and exits 0; ``train.resume=auto`` continues the step count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rollout_dumps import (
    HOOKS,
    assert_same_rows,
    first_step_loss,
    pending,
    response_tokens,
    rows,
    rows_in_global_order,
)
from torchrun import launcher

from vp2o.metrics import read_metrics

HERE = Path(__file__).resolve().parent
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.num_experts=4",
    "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64", "model.vocab_size=64",
    "model.max_position_embeddings=64", "data.num_train_prompts=64", "data.num_eval_prompts=8",
    "rollout.group_size=4", "rollout.max_new_tokens=4", "rollout.micro_batch_size=8",
    "reward.workers=0", "reward.name=scaleout_reward:length_reward", "optimizer.lr=1e-3",
    "optimizer.decay_style=constant", "optimizer.weight_decay=0.0", "train.wandb_mode=disabled",
]




def _env() -> dict:
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


SFT = ["sft", *TINY, "sft.steps=3", "sft.batch_size=8"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    """The same starting weights under every layout (a fresh init depends on the EP layout):
    a 3-step SFT checkpoint, which loads under any layout."""
    run_dir = tmp_path_factory.mktemp("scaleout") / "sft"
    _run([sys.executable, "-m", "vp2o.cli", *SFT, f"train.run_dir={run_dir}"])
    return run_dir


@pytest.mark.slow
def test_four_process_expert_parallel_matches_single_process_first_step(tmp_path, sft):
    """The first batch, loss and batch statistics (see the module docstring), and VP2O's
    accept / roll back / refresh inputs (§10-§11): D, drift and ESS of the whole batch, which
    the ranks combine from their shares, so rank 0 logs the single process's values (its own
    share, a quarter of the sequences, would give others)."""
    common = [*TINY, "algorithm=vp2o", "train.steps=1", "vp2o.variance_coeff=0",
              f"train.init_checkpoint={sft / 'checkpoints'}",
              f"data.tokenizer_path={sft / 'tokenizer.model'}"]
    _run([sys.executable, str(HOOKS), "--dump", str(tmp_path / "dump1"), "--", "train", *common,
          "rollout.prompts_per_step=4", f"train.run_dir={tmp_path / 'single'}"])
    _run([*launcher(4), str(HOOKS), "--dump", str(tmp_path / "dump4"), "--", "train", *common,
          "rollout.prompts_per_step=1", "parallel.expert_parallel=2",
          f"train.run_dir={tmp_path / 'four'}"])
    single, four = pending(tmp_path / "dump1"), pending(tmp_path / "dump4")
    assert len(single) == 1 and len(four) == 4
    # rank r took global prompt r: the union over ranks, in rank order, is the single batch
    expected, got = rows(single), rows_in_global_order(four, group=4)
    assert len(got) == len(expected) == 16
    assert_same_rows(expected, got, logprob_atol=1e-5, logprob_rtol=1e-4)
    assert any(a != 0 for *_, a, _ in expected), "the reward should give non-zero advantages"
    single = read_metrics(tmp_path / "single" / "metrics.jsonl")[0]
    rank0 = read_metrics(tmp_path / "four" / "metrics.jsonl")[0]
    assert single["loss/policy"] == pytest.approx(first_step_loss(four), rel=1e-4, abs=1e-6)
    # Rank 0 logs the global batch's statistics (the ranks' shares gathered), not its own share
    # (which differs here: the share's loss is shown for contrast).
    share = first_step_loss(four[:1]) * response_tokens(four[:1]) / (response_tokens(four) / 4)
    assert share != pytest.approx(single["loss/policy"], rel=1e-3)
    for key in ("loss/policy", "reward/mean", "reward/std", "accuracy", "response/length_mean",
                "policy/entropy"):
        assert rank0[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    assert first_step_loss(four) != pytest.approx(0.0, abs=1e-4)
    # Drift, ESS and D after the update (what VP2O's §10/§11 budgets decide on; before it the
    # learner's log-probs equal the actors' up to rounding). The update is layout-independent
    # with the routing-variance loss off (like megatron's aux losses it takes per-micro-batch
    # statistics, and the layouts' micro-batches differ).
    assert single["behavior/drift_after"] > 1e-3  # the step moved the policy: a real test
    for key in ("behavior/drift_after", "behavior/ess_after"):  # smooth: rounding only
        assert rank0[key] == pytest.approx(single[key], rel=1e-4), key
    # D also counts which experts each token picks after the update: a near-tie that rounds the
    # other way under the other layout moves it by ~1/(tokens x layers) of a distance.
    assert rank0["trust/anchor_distance"] == pytest.approx(
        single["trust/anchor_distance"], rel=3e-3)


@pytest.mark.slow
def test_two_process_sft_is_the_single_process_sft(tmp_path, sft):
    """SFT's global batch (sft.batch_size sequences, drawn the same on every rank) split over 2
    data-parallel ranks, each dividing by the global answer-token count / 2: the same loss at
    every step as one process on the whole batch. (Before, each rank drew its own batch_size
    rows from its own generator and divided by its own count.) One process: the ``sft``
    fixture's run."""
    _run([*launcher(2), "-m", "vp2o.cli", *SFT, f"train.run_dir={tmp_path / 'two'}"])
    single = read_metrics(sft / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [0, 1, 2]
    for a, b in zip(single, two, strict=True):
        assert b["loss/sft"] == pytest.approx(a["loss/sft"], rel=1e-4), a["step"]
    assert single[2]["loss/sft"] != pytest.approx(single[0]["loss/sft"], rel=1e-3)  # it learns


@pytest.mark.slow
def test_usr1_checkpoints_exits_zero_and_resume_continues_on_more_ranks(tmp_path):
    """SIGUSR1 to the launcher (torchrun forwards it, as under SLURM) on a 1-process run: a
    checkpoint, exit 0. Resumed by 2 processes: the saved rollout batch (one per saving rank) is
    dropped on every rank with a warning, and training goes on. (Once rank 1 raised an IndexError
    on it and rank 0 waited in the next collective until the process-group timeout.)"""
    run_dir = tmp_path / "run"
    common = [*TINY, "algorithm=vp2o", "rollout.prompts_per_step=2", f"train.run_dir={run_dir}"]
    # --standalone: the rendezvous binds port 0 as it starts (no port picked in advance that
    # another test worker's job could take first)
    def launcher(nproc: int) -> list[str]:
        return [sys.executable, "-m", "vp2o.launch", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "vp2o.cli", "train"]

    proc = subprocess.Popen([*launcher(1), *common, "train.steps=500"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and read_metrics(metrics)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step logged"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # to torchrun only: it forwards to the worker
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    assert "stopped at step" in out
    stopped = int(out.split("stopped at step")[1].split()[0])
    assert 1 <= stopped < 500
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}" / "complete.json").is_file()
    resumed = _run([*launcher(2), *common, f"train.steps={stopped + 2}", "train.resume=auto"])
    assert "resumed on 2 ranks from a checkpoint of 1: its unfinished rollout batches are " \
           "dropped" in resumed.stdout + resumed.stderr
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(stopped + 2))


def test_per_prompt_generators_make_samples_independent_of_the_batch():
    from vp2o.rollout.sampling import SamplingParams, sample_next

    params = SamplingParams(temperature=1.0, group_size=3)
    logits = torch.randn(4 * 3, 50, generator=torch.Generator().manual_seed(0))  # 4 prompts

    def gens(ids):
        return [torch.Generator().manual_seed(1000 + i) for i in ids]

    together, _ = sample_next(logits, params, gens(range(4)))
    for halves in ((0, 1), (2, 3)):
        rows = slice(halves[0] * 3, (halves[1] + 1) * 3)
        alone, _ = sample_next(logits[rows], params, gens(halves))
        assert torch.equal(alone, together[rows])
    single, _ = sample_next(logits, params, torch.Generator().manual_seed(5))
    again, _ = sample_next(logits, params, [torch.Generator().manual_seed(5)])
    assert torch.equal(single, again)  # one generator: unchanged behaviour
    with pytest.raises(ValueError, match="generator blocks"):
        sample_next(logits, params, gens(range(5)))


@pytest.mark.slow
def test_every_loss_statistic_reaches_metrics_with_its_reduction(tmp_path, sft):
    """Every statistic the policy loss returns (KL and dual clip on) is in metrics.jsonl of a
    2-process run, reduced as declared: at step 0 (two updates on one batch, so the second one's
    ratios differ from 1; the step logs their mean) rank 0 logs the single process's values. A
    per-rank or per-micro-batch value would differ: ratio/max is the largest ratio of the global
    batch, the token means weigh every response token of the global batch alike, the loss is the
    global batch's."""
    from vp2o.algo import grpo
    from vp2o.config import load_config
    from vp2o.train import train

    common = [*TINY, "algorithm=grpo", "train.steps=1", "train.updates_per_rollout=2",
              "loss.kl_coeff=0.05", "loss.clip_ratio_c=3.0", "loss.clip_high=0.01",
              "loss.clip_low=0.01", "optimizer.lr=2e-2", "rollout.micro_batch_size=3",
              f"train.init_checkpoint={sft / 'checkpoints'}",
              f"data.tokenizer_path={sft / 'tokenizer.model'}"]
    _run([*launcher(2), "-m", "vp2o.cli", "train", *common, "rollout.prompts_per_step=2",
          f"train.run_dir={tmp_path / 'two'}"])
    # The single-process reference runs in this process (the reward module is on sys.path).
    train(load_config(None, [*common, "rollout.prompts_per_step=4",
                             f"train.run_dir={tmp_path / 'single'}"]))
    single = read_metrics(tmp_path / "single" / "metrics.jsonl")[0]
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    produced = {"loss/policy", "loss/kl", "ratio/mean", "ratio/max", "clip/low_frac",
                "clip/high_frac", "clip/dual_frac", "kl/k3", "policy/entropy"}
    assert produced <= set(grpo.POLICY_LOSS_STATS) | {"policy/entropy"}
    assert produced <= set(single) and produced <= set(two), produced - set(two)
    assert single["ratio/max"] > 1.0 + 1e-3  # the step moved the policy: a real maximum
    assert single["clip/high_frac"] > 0
    for key in sorted(produced):
        assert two[key] == pytest.approx(single[key], rel=2e-3, abs=1e-5), key
