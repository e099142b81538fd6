"""`vp2o train` end to end at toy size: both modes, resume equality, EP=2 over torchrun.

The RL loop runs the real megatron-core model on CPU with the built-in arithmetic task.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_train import TINY

from vp2o.config import load_config
from vp2o.metrics import read_metrics

STEP_KEYS = {
    "reward/mean", "accuracy", "loss/policy", "router/entropy", "experts/load",
    "experts/load_entropy", "experts/overlap", "prototypes/mean_abs_cosine",
    "prototypes/similarity", "behavior/drift", "behavior/ess", "events/refresh",
    "perf/step_s", "perf/train_s", "perf/generate_s",
}


def _train(run_dir: Path, *extra: str) -> dict:
    from vp2o.train import train

    return train(load_config(None, [*TINY, f"train.run_dir={run_dir}", *extra]))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "vp2o"])
def test_train_logs_every_step_and_writes_eval(tmp_path, algorithm):
    result = _train(tmp_path / algorithm, f"algorithm={algorithm}", "train.steps=3",
                    "train.wandb_mode=offline")
    rows = read_metrics(tmp_path / algorithm / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert STEP_KEYS <= set(row), STEP_KEYS - set(row)
        assert 0.0 <= row["reward/mean"] <= 1.0
        assert abs(sum(row["experts/load"][0]) - 1.0) < 1e-5
    if algorithm == "vp2o":
        assert all("trust/anchor_distance" in r and "stein/repulsion_norm" in r for r in rows)
        # §9 losses: the scale-free orthogonality loss is a mean squared cosine in (0, 1];
        # the routing-variance loss is minus a variance (< 0)
        assert all(0.0 < r["loss/orthogonality"] <= 1.0 for r in rows)
        assert all(r["loss/routing_variance"] < 0.0 for r in rows)
    else:
        assert not any("loss/orthogonality" in r for r in rows)
    assert rows[0]["events/refresh"] == 1.0
    evaluation = json.loads((tmp_path / algorithm / "eval.json").read_text())
    assert evaluation["num_prompts"] == 8 and 0.0 <= evaluation["held_out_accuracy"] <= 1.0
    assert result["held_out_accuracy"] == evaluation["held_out_accuracy"]
    offline = list((tmp_path / algorithm / "wandb").glob("offline-run-*"))
    assert offline, "wandb offline run directory"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "vp2o"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, algorithm):
    # two learner updates per rollout batch: the resumed run must also restore the optimizer,
    # the prototypes, the prompt position and the budget counters
    # a reward with signal on the untrained model (exact scores 0 everywhere: zero advantages,
    # zero gradients, nothing for a resume to get wrong)
    common = [f"algorithm={algorithm}", "train.wandb_mode=disabled",
              "train.updates_per_rollout=2", "train.save_every=2",
              "reward.name=eval_worker:parity_reward"]
    _train(tmp_path / "full", *common, "train.steps=4")
    _train(tmp_path / "split", *common, "train.steps=2")
    _train(tmp_path / "split", *common, "train.steps=4", "train.resume=auto")
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in split] == [0, 1, 2, 3]
    for a, b in zip(full, split, strict=True):
        keys = ["reward/mean", "loss/policy", "behavior/drift", "experts/overlap",
                "prototypes/mean_abs_cosine", "train/updates", "progress/samples",
                "progress/generated_tokens", "progress/updates"]
        for key in keys:
            assert key in a and key in b, (a["step"], key)  # a missing key fails, not skips
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert any(r["loss/policy"] != 0.0 for r in full[2:])  # the resumed half learns something
    if algorithm == "grpo":  # the fixed schedule: every update of every batch
        assert [r["train/updates"] for r in full] == [2.0] * 4


@pytest.mark.slow
def test_both_algorithms_consume_the_same_data_budget(tmp_path):
    """train.steps counts rollout batches under both algorithms: with the same config (two
    updates per batch allowed; VP2O may end a batch early on a §10/§11 budget, here forced by
    a zero drift budget) both runs see the same prompts and samples, and the prompt stream of
    both checkpoints stands at the same position."""
    import torch

    common = ["train.wandb_mode=disabled", "train.updates_per_rollout=2", "train.steps=3"]
    _train(tmp_path / "grpo", "algorithm=grpo", *common)
    _train(tmp_path / "vp2o", "algorithm=vp2o", *common, "vp2o.behavior.eps_drift=0.0")
    grpo = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    vp2o = read_metrics(tmp_path / "vp2o" / "metrics.jsonl")
    cfg = load_config(None, [*TINY])
    per_step = cfg.rollout.prompts_per_step
    for key, value in (("progress/prompts", 3 * per_step),
                       ("progress/samples", 3 * per_step * cfg.rollout.group_size)):
        assert grpo[-1][key] == vp2o[-1][key] == value, key
    assert [r["train/updates"] for r in grpo] == [2.0] * 3
    assert [r["train/updates"] for r in vp2o] == [1.0] * 3  # the drift budget ended each batch
    assert all(r["events/early_refresh"] == 1.0 for r in vp2o)

    def position(run: str) -> dict:
        ckpt = sorted((tmp_path / run / "checkpoints").glob("step_*"))[-1]
        return torch.load(ckpt / "trainer_state.pt", weights_only=True)["extra"]["prompts"]

    assert position("grpo") == position("vp2o")


@pytest.mark.slow
def test_kl_reference_is_the_frozen_starting_policy(tmp_path):
    """loss.kl_coeff > 0 keeps a frozen reference: KL is 0 before the first update, > 0 after."""
    _train(tmp_path / "kl", "train.steps=2", "loss.kl_coeff=0.1", "train.wandb_mode=disabled",
           "reward.name=scaleout_reward:length_reward", "optimizer.lr=1e-2")
    rows = read_metrics(tmp_path / "kl" / "metrics.jsonl")
    assert rows[0]["kl/k3"] == pytest.approx(0.0, abs=1e-7)
    assert rows[1]["kl/k3"] > 1e-6


@pytest.mark.slow
def test_ten_consecutive_rollbacks_warn_with_the_fields_to_change(tmp_path, capsys):
    # delta = 0: every update moves the barycenters a little, so every step is rolled back
    _train(tmp_path / "r", "algorithm=vp2o", "train.steps=10", "train.wandb_mode=disabled",
           "vp2o.trust_region.delta=0.0")
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["trust/accepted"] for r in rows] == [0.0] * 10
    out = capsys.readouterr().out
    assert out.count("the anchor trust region rejected 10 consecutive steps") == 1
    assert "lower optimizer.lr or raise vp2o.trust_region.delta" in out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["packed", "drift_ends_batch", "rollback"])
def test_check_in_next_forward_equals_a_forward_of_its_own(tmp_path, monkeypatch, case):
    """vp2o.check_in_next_forward: the post-update check read from the next update's forward
    gives the same D, drift/ESS after the update, decisions and trajectory as the check's own
    no-grad forward, whether the batch continues (packed micro-batches: the routing scattered
    back from the packed row), ends on the drift budget (padded; the next update's gradients
    dropped unstepped) or is rolled back (§10); that it runs only the last update's check
    forward while batches go on, and stops reading the next forward once they end early."""
    from vp2o.learner import Learner

    loose = ["vp2o.trust_region.delta=10", "vp2o.behavior.eps_drift=10",
             "vp2o.behavior.ess_min=0"]
    extra = {"packed": [*loose, "train.max_tokens_per_microbatch=40", "model.core_attention=sdpa"],
             "drift_ends_batch": ["vp2o.trust_region.delta=10", "vp2o.behavior.eps_drift=0.0"],
             "rollback": ["vp2o.trust_region.delta=0.0"]}[case]
    common = ["algorithm=vp2o", "train.wandb_mode=disabled", "train.updates_per_rollout=3",
              "train.steps=2", "reward.name=scaleout_reward:length_reward", *extra]
    forwards = []
    own = Learner.evaluate_update

    def counted(self, *args, **kwargs):
        forwards[-1] += 1
        return own(self, *args, **kwargs)

    monkeypatch.setattr(Learner, "evaluate_update", counted)
    runs = {}
    for fused in (False, True):
        forwards.append(0)
        _train(tmp_path / str(fused), *common, f"vp2o.check_in_next_forward={fused}")
        runs[fused] = read_metrics(tmp_path / str(fused) / "metrics.jsonl")
    keys = ["trust/anchor_distance", "trust/accepted", "behavior/drift_after",
            "behavior/ess_after", "behavior/drift", "loss/policy", "reward/mean",
            "train/updates", "prototypes/mean_abs_cosine", "stein/attraction_norm",
            "router/entropy", "experts/overlap"]
    for a, b in zip(runs[False], runs[True], strict=True):
        for key in keys:
            if key in ("behavior/drift_after", "behavior/ess_after") and case in (
                    "drift_ends_batch", "rollback"):
                continue  # only logged for updates another may follow (not after the last)
            assert key in a and key in b, (a["step"], key)
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    updates = [r["train/updates"] for r in runs[True]]
    if case == "packed":
        assert updates == [3.0] * 2
        assert forwards == [6, 2]  # every check / only each batch's last
    else:
        assert updates == [1.0] * 2
        # the first batch reads its check from the next forward and drops that backward; the
        # second, with 1 of 1 batches ended there (not > 2/3 going on), runs its own forward
        assert forwards == [2, 1]
        assert [r.get("events/discarded_backward", 0.0) for r in runs[True]] == [1.0, 0.0]


@pytest.mark.slow
def test_actor_gates_from_the_first_forward_equal_the_engines(tmp_path, monkeypatch):
    """An engine that returns routed-expert ids only (CUDA vLLM): the learner's first forward on
    each batch reports the actors' gates at those experts (Learner.fills_actor_gates), and the
    run equals the one whose engine returned its own gates: the same §10 anchor distances,
    decisions and trajectory (the megatron engine, its gates dropped from every batch)."""
    import torch

    from vp2o.rollout.megatron_engine import MegatronEngine

    common = ["algorithm=vp2o", "train.wandb_mode=disabled", "train.updates_per_rollout=2",
              "train.steps=2", "reward.name=scaleout_reward:length_reward",
              "vp2o.trust_region.delta=0.2"]
    _train(tmp_path / "gates", *common)
    generate = MegatronEngine.generate
    dropped = []

    def ids_only(self, *args, **kwargs):
        batch = generate(self, *args, **kwargs)
        dropped.append(batch.routing_gates)
        batch.routing_gates = torch.empty(0)
        return batch

    monkeypatch.setattr(MegatronEngine, "generate", ids_only)
    _train(tmp_path / "ids", *common)
    assert len(dropped) >= 2 and all(g.numel() for g in dropped)  # 2 steps + evaluation
    full = read_metrics(tmp_path / "gates" / "metrics.jsonl")
    ids = read_metrics(tmp_path / "ids" / "metrics.jsonl")
    for a, b in zip(full, ids, strict=True):
        for key in ("trust/anchor_distance", "trust/accepted", "train/updates", "loss/policy",
                    "reward/mean", "prototypes/mean_abs_cosine"):
            assert key in a and key in b, (a["step"], key)
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


_TWO_SESSIONS = """
import gc, os, sys
from tiny_train import TINY
from vp2o.config import load_config
from vp2o.train import train
for i in range(2):
    train(load_config(None, [*TINY, f"train.run_dir={sys.argv[1]}/{i}", "train.steps=1",
                             "algorithm=vp2o", "train.wandb_mode=disabled"]))
    gc.collect()  # the caller's frame held the session until train() returned
    names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
    print("gloo threads:", sum(name.startswith(("pt_gloo", "gloo")) for name in names))
"""


def test_a_finished_session_frees_its_process_groups(tmp_path):
    """Two `vp2o train` sessions in one process (as `vp2o demo` runs its arms): the second ends
    with as many gloo threads as the first, and far fewer than one session's groups hold (58
    here). Before megatron's optimizer was built without autograd, its fp32 shards (views of the
    parameters) tied each finished session's model, optimizers and every process group to C++
    autograd nodes the garbage collector cannot see: 58 threads more per session (docs/design.md,
    "Releasing a model"). A fresh process: the test session keeps its own groups."""
    import subprocess
    import sys

    tests = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _TWO_SESSIONS, str(tmp_path)], text=True,
                          capture_output=True, timeout=600, cwd=tests.parent,
                          env={**__import__("os").environ, "PYTHONPATH": str(tests)})
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (int(line.split(":")[1]) for line in done.stdout.splitlines()
                     if line.startswith("gloo threads:"))
    assert second == first and first < 20, (first, second)
