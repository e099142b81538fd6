"""A checkpoint that does not fit the model or optimizer: a clear error, nothing half-loaded."""

from __future__ import annotations

import pytest
import torch
from ckpt_helpers import build_run, global_params, small_config, train_step

from vp2o.mcore import checkpoint as ck


@pytest.fixture
def saved(init_parallel, tmp_path):
    """A checkpoint of the small model (4 experts, Adam) after one step."""
    cfg = small_config()
    init_parallel(cfg)
    run = build_run(cfg)
    train_step(run, 0)
    return ck.save_checkpoint(
        tmp_path, 1, model=run.ddp, optimizer=run.opt, scheduler=run.sched, extra={}
    )


@pytest.mark.parametrize(
    "override, key, have, want",
    [
        ("model.num_experts=8", "decoder.layers.mlp.router.weight", (2, 4, 64), (2, 8, 64)),
        ("model.vocab_size=256", "embedding.word_embeddings.weight", (128, 64), (256, 64)),
    ],
)
def test_checkpoint_of_another_model_shape(saved, override, key, have, want):
    other = build_run(small_config(extra=[override]))
    before = global_params(other)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_checkpoint(saved, model=other.ddp, optimizer=other.opt, scheduler=other.sched)
    msg = str(e.value)
    assert str(saved) in msg and repr(key) in msg, msg
    assert f"shape {have} in the checkpoint" in msg and f"needs {want}" in msg, msg
    for name, value in global_params(other).items():  # checked before anything was loaded
        assert torch.equal(value, before[name]), name


def test_checkpoint_of_another_optimizer(saved):
    """Adam state requested from an SGD checkpoint: the missing tensor is named."""
    sgd = build_run(small_config(optimizer="sgd", distributed=False))
    sgd_root = saved.parent / "sgd"
    ck.save_checkpoint(sgd_root, 1, model=sgd.ddp, optimizer=sgd.opt, scheduler=sgd.sched, extra={})
    adam = build_run(small_config())
    missing = r"does not fit this optimizer: it has no tensor 'optimizer\.state\."
    with pytest.raises(ck.CheckpointError, match=missing):
        ck.load_checkpoint(
            sgd_root / "step_00000001", model=adam.ddp, optimizer=adam.opt, scheduler=adam.sched
        )
