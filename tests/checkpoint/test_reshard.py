"""Checkpoints across parallel layouts: EP=1 on 1 rank <-> EP=2 on 2 ranks (torchrun, gloo),
with the distributed optimizer and with the plain one.

One module fixture: this process trains the small MoE two steps at EP=1, saves, and trains two
more; then ``ckpt_worker.py reshard`` (2 ranks, EP=2) loads those checkpoints and does the same
from its own start. Each direction is then checked: the loaded parameters equal the saved ones
exactly, and the two steps after loading give the losses of the uninterrupted run (which checks
the resharded Adam moments and step counts, and the scheduler).
"""

from __future__ import annotations

import pytest
import torch
from ckpt_helpers import (
    all_global_params,
    build_run,
    global_params,
    run_worker,
    small_config,
    train_step,
)

from vp2o.mcore import checkpoint as ck
from vp2o.mcore import parallel

KINDS = ("distributed", "plain")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{kind: EP=1 record}, the 2-rank worker's record, and the checkpoint directory."""
    root = tmp_path_factory.mktemp("reshard")
    ep1 = {}
    parallel.initialize(small_config(ep=1))
    try:
        for kind in KINDS:
            run = build_run(small_config(ep=1, distributed=kind == "distributed"))
            for step in (0, 1):
                train_step(run, step)
            ck.save_checkpoint(
                root / f"ep1_{kind}",
                2,
                model=run.ddp,
                optimizer=run.opt,
                scheduler=run.sched,
                extra={"step": 2, "layout": "ep1"},
            )
            params = global_params(run)
            ep1[kind] = {"params": params, "losses": [train_step(run, s) for s in (2, 3)]}
    finally:
        parallel.destroy()
    out = root / "ep2.pt"
    proc = run_worker(2, "reshard", "--dir", str(root), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return ep1, torch.load(out), root


def assert_params_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_ep1_checkpoint_loads_on_two_ranks_with_ep2(runs, kind):
    ep1, ep2, _ = runs
    got = ep2[f"from_ep1_{kind}"]
    assert got["extra"] == {"step": 2, "layout": "ep1"}
    assert_params_equal(got["params"], ep1[kind]["params"])
    assert got["losses"] == pytest.approx(ep1[kind]["losses"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_ep2_checkpoint_loads_on_one_rank_with_ep1(runs, init_parallel, kind):
    _, ep2, root = runs
    cfg = small_config(ep=1, distributed=kind == "distributed")
    init_parallel(cfg)
    run = build_run(cfg)
    path = ck.latest_checkpoint(root / f"ep2_{kind}")
    assert ck.read_marker(path)["layout"]["expert_parallel"] == 2
    with pytest.warns(UserWarning, match="reseeding"):
        extra = ck.load_checkpoint(path, model=run.ddp, optimizer=run.opt, scheduler=run.sched)
    assert extra == {"step": 2, "layout": "ep2"}
    assert_params_equal(all_global_params(run), ep2[f"ep2_{kind}"]["params"])
    losses = [train_step(run, s) for s in (2, 3)]
    assert losses == pytest.approx(ep2[f"ep2_{kind}"]["losses"], rel=1e-5)
