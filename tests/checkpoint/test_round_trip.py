"""Save, restart, load: the resumed run equals the uninterrupted one (one process, real megatron).

The uninterrupted run trains two steps, saves, draws from every random generator, and trains two
more steps. The resumed run builds a fresh model and optimizer in a scrambled RNG state, loads
the checkpoint, draws again and trains the same two steps: the draws, the losses, the parameters,
the learning rate and ``extra`` must be identical (bit for bit: same process, same layout).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from ckpt_helpers import build_run, global_params, small_config, train_step

from vp2o.config import to_dict
from vp2o.mcore import checkpoint as ck

KINDS = {
    "adam_distributed": dict(optimizer="adam", distributed=True),
    "adam": dict(optimizer="adam", distributed=False),
    "sgd_momentum": dict(optimizer="sgd", distributed=False, extra=["optimizer.sgd_momentum=0.9"]),
}


def draws() -> dict:
    """One draw from each generator a checkpoint restores."""
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(4)
    return {
        "torch": torch.rand(4),
        "tracker": tracked,
        "python": random.random(),
        "numpy": np.random.rand(4).tolist(),
    }


def scramble_rng() -> None:
    from megatron.core import tensor_parallel

    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    tensor_parallel.model_parallel_cuda_manual_seed(999, force_reset_rng=True)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_resume_equals_uninterrupted_run(init_parallel, tmp_path, kind):
    cfg = small_config(**KINDS[kind])
    init_parallel(cfg)
    run = build_run(cfg)
    for step in (0, 1):
        train_step(run, step)
    extra = {
        "step": 2,
        "data_position": 8,
        "stein": {"prototypes": torch.randn(2, 4, 64), "anchor": torch.randn(2, 4, 64)},
        "config": to_dict(cfg),
    }
    model = run.ddp if kind != "sgd_momentum" else run.model  # DDP or the bare GPTModel
    path = ck.save_checkpoint(
        tmp_path, 2, model=model, optimizer=run.opt, scheduler=run.sched, extra=extra
    )
    assert path == tmp_path / "step_00000002" and ck.latest_checkpoint(tmp_path) == path
    want_draws = draws()
    want_losses = [train_step(run, step) for step in (2, 3)]
    want_params = global_params(run)
    want_lr = [g["lr"] for g in run.opt.param_groups]

    scramble_rng()
    resumed = build_run(cfg)
    got_extra = ck.load_checkpoint(
        path, model=resumed.ddp, optimizer=resumed.opt, scheduler=resumed.sched
    )
    assert_same(draws(), want_draws)  # the next random draws continue the saved streams
    assert got_extra["step"] == 2 and got_extra["data_position"] == 8
    assert got_extra["config"] == to_dict(cfg)
    for key in ("prototypes", "anchor"):
        assert torch.equal(got_extra["stein"][key], extra["stein"][key])
    assert resumed.sched.num_steps == run.sched.num_steps - 2
    got_losses = [train_step(resumed, step) for step in (2, 3)]
    assert got_losses == want_losses
    got_params = global_params(resumed)
    for name, value in want_params.items():
        assert torch.equal(got_params[name], value), name
    assert [g["lr"] for g in resumed.opt.param_groups] == want_lr
    if kind != "sgd_momentum":  # torch Adam's step count: one per update, for every parameter
        steps = {
            float(s["step"])
            for o in resumed.opt.chained_optimizers
            for s in o.optimizer.state.values()
        }
        assert steps == {4.0}


def assert_same(got: dict, want: dict) -> None:
    for key in want:
        a, b = got[key], want[key]
        if torch.is_tensor(b):
            assert torch.equal(a, b), key
        else:
            assert a == b, key


def test_save_before_the_first_step_resumes_like_a_fresh_optimizer(init_parallel, tmp_path):
    """An optimizer that has not stepped yet saves (megatron alone asserts) and resumes."""
    cfg = small_config(distributed=True)
    init_parallel(cfg)
    run = build_run(cfg)
    path = ck.save_checkpoint(
        tmp_path, 0, model=run.ddp, optimizer=run.opt, scheduler=run.sched, extra={"step": 0}
    )
    want = [train_step(run, step) for step in (0, 1)]
    resumed = build_run(cfg)
    with torch.no_grad():  # not the saved weights: the load must put them back
        for p in resumed.model.parameters():
            p.add_(1.0)
    ck.load_checkpoint(path, model=resumed.ddp, optimizer=resumed.opt, scheduler=resumed.sched)
    assert [train_step(resumed, step) for step in (0, 1)] == want


def test_weights_only_load(init_parallel, tmp_path, monkeypatch):
    """optimizer=None, scheduler=None loads just the model (an SFT warm start). The save starts
    no process: megatron's writer reports its results through an in-process queue
    (save_load._in_process_write_results), not the spawned Manager it makes by default."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as in a fresh process
    cfg = small_config()
    init_parallel(cfg)
    run = build_run(cfg)
    train_step(run, 0)
    train_step(run, 1)  # step 0 runs at the warmup's lr 0: only step 1 moves the weights
    before = {p.pid for p in multiprocessing.active_children()}
    path = ck.save_checkpoint(
        tmp_path, 1, model=run.ddp, optimizer=run.opt, scheduler=run.sched, extra={}
    )
    assert [p for p in multiprocessing.active_children() if p.pid not in before] == []
    fresh = build_run(cfg)
    want = global_params(run)
    assert any(not torch.equal(v, want[n]) for n, v in global_params(fresh).items())
    ck.load_checkpoint(path, model=fresh.model, optimizer=None, scheduler=None)
    for name, value in global_params(fresh).items():
        assert torch.equal(value, want[name]), name
