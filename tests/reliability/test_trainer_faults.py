"""Faults inside a training run (in-process, tiny config): rewards that crash, hang or return
NaN; non-finite losses and gradients, skipped, and the stop after too many in a row."""

from __future__ import annotations

import pytest
import torch
from faulty_rewards import kind
from rel_helpers import TINY, checkpoint_tensors, trainer_extra

import vp2o.train as train_module
from vp2o.algo import grpo
from vp2o.config import load_config
from vp2o.mcore.checkpoint import latest_checkpoint
from vp2o.metrics import read_metrics

pytestmark = pytest.mark.slow


def _train(run_dir, *extra):
    return train_module.train(load_config(None, [*TINY, f"train.run_dir={run_dir}", *extra]))


@pytest.fixture
def rollouts(monkeypatch):
    """Records each step's rollout (completions, rewards, stats); ``state['step']`` is the step
    whose rollout was made last."""
    seen: dict = {"step": None, "batches": {}}
    real = train_module.make_rollouts

    def make_rollouts(s, rows, pool, step):
        seen["step"] = step
        pending = real(s, rows, pool, step)
        seen["batches"][step] = pending
        return pending

    monkeypatch.setattr(train_module, "make_rollouts", make_rollouts)
    return seen


def test_crashing_hanging_nan_reward_scores_0_and_is_counted(tmp_path, monkeypatch, rollouts):
    """faulty_rewards:flaky in a worker process: a crash or NaN scores 0, the one hang is cut at
    reward.timeout_s and scores 0, every failure is counted in reward/failures, the run ends."""
    marker = tmp_path / "hung"
    monkeypatch.setenv("VP2O_TEST_HANG_MARKER", str(marker))
    result = _train(tmp_path / "run", "reward.name=faulty_rewards:flaky", "reward.workers=1",
                    "reward.timeout_s=3", "train.steps=2")
    assert "held_out_accuracy" in result
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    hung = marker.read_text()
    total = 0
    for step, pending in rollouts["batches"].items():
        completions = pending.batch.completions
        kinds = [kind(c) for c in completions]
        failed = [k in (0, 1) for k in kinds]
        if step == 0:
            assert completions[0] == hung  # the first sample scored hung
            failed[0] = True
        want = [0.0 if f else float(k == 2) for f, k in zip(failed, kinds, strict=True)]
        assert pending.rewards.tolist() == want, step
        assert rows[step]["reward/failures"] == sum(failed), step
        total += sum(failed)
    assert total > 0


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradients backward (finite loss, non-finite gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _poison(monkeypatch, rollouts, steps: set[int], mode: str) -> None:
    real = grpo.policy_loss

    def policy_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        if rollouts["step"] in steps:
            loss = loss * float("nan") if mode == "loss" else _NanGrad.apply(loss)
        return loss, stats

    monkeypatch.setattr(grpo, "policy_loss", policy_loss)


@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_non_finite_step_is_skipped_and_logged(tmp_path, monkeypatch, rollouts, mode):
    """Step 1's loss (or only its gradients) is NaN: no optimizer step (the weights and optimizer
    state after step 1 equal those after step 0), events/skipped_step logged, the run goes on."""
    _poison(monkeypatch, rollouts, {1}, mode)
    run = tmp_path / "run"
    _train(run, "train.steps=3", "train.save_every=1", "train.keep_last=5")
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r.get("events/skipped_step", 0.0) for r in rows] == [0.0, 1.0, 0.0]
    ck = run / "checkpoints"
    after0 = checkpoint_tensors(ck / "step_00000001", tmp_path)
    after1 = checkpoint_tensors(ck / "step_00000002", tmp_path)
    after2 = checkpoint_tensors(ck / "step_00000003", tmp_path)
    assert after0.keys() == after1.keys()
    for key, value in after0.items():
        assert torch.equal(value, after1[key]), key
        assert torch.isfinite(after2[key]).all(), key
    assert any(not torch.equal(v, after2[k]) for k, v in after1.items())  # step 2 trained


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """NaN losses from step 2 on, max_consecutive_skips=2: stops at step 3."""
    tmp = tmp_path_factory.mktemp("skips")
    with pytest.MonkeyPatch.context() as mp:
        seen: dict = {"step": None}
        real = train_module.make_rollouts

        def make_rollouts(s, rows, pool, step):
            seen["step"] = step
            return real(s, rows, pool, step)

        mp.setattr(train_module, "make_rollouts", make_rollouts)
        _poison(mp, seen, set(range(2, 100)), "loss")
        with pytest.raises(RuntimeError) as e:
            _train(tmp / "run", "train.steps=8", "train.save_every=1", "train.keep_last=10",
                   "train.max_consecutive_skips=2")
    return tmp, str(e.value)


def test_too_many_skips_stop_with_a_checkpoint_of_the_last_good_state(stopped_run):
    tmp, message = stopped_run
    ck = tmp / "run" / "checkpoints"
    assert "2 consecutive steps had non-finite loss or gradients" in message
    assert "stopped at step 3" in message and str(ck) in message
    rows = read_metrics(tmp / "run" / "metrics.jsonl")
    assert [r.get("events/skipped_step", 0.0) for r in rows[:3]] == [0.0, 0.0, 1.0]
    latest = latest_checkpoint(ck)
    assert latest == ck / "step_00000003"
    assert trainer_extra(latest)["consecutive_skips"] == 2
    good = checkpoint_tensors(ck / "step_00000002", tmp)  # after steps 0 and 1
    last = checkpoint_tensors(latest, tmp)
    assert good.keys() == last.keys()
    for key, value in good.items():
        assert torch.equal(value, last[key]), key


def test_the_stopping_step_is_logged_too(stopped_run):
    tmp, _ = stopped_run
    rows = read_metrics(tmp / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["events/skipped_step"] == 1.0


def test_a_reward_whose_workers_never_start_stops_the_run_with_a_checkpoint(tmp_path):
    """Every batch's workers fail to import the reward module: each batch scores 0 and counts in
    reward/not_started; after reward.max_start_failures such batches in a row the run stops with
    a checkpoint and says why."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError) as e:
        _train(run, "reward.name=worker_import_fails:score", "reward.workers=1",
               "reward.max_start_failures=2", "train.steps=6")
    message = str(e.value)
    assert "'worker_import_fails:score': its workers did not start in 2 consecutive" in message
    assert "BrokenProcessPool" in message  # the workers printed their own error (stderr)
    assert "Stopped after step 1" in message and str(run / "checkpoints") in message
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["reward/not_started"] == 1.0 and r["reward/mean"] == 0.0 for r in rows)
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_00000002"
