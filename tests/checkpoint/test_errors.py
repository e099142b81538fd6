"""A checkpoint that does not fit the model or optimizer: a clear error, nothing half-loaded."""

from __future__ import annotations

import pytest
import torch
from ckpt_helpers import build_run, global_params, small_config, train_step

from vp2o.mcore import checkpoint as ck


@pytest.fixture
def saved(init_parallel, tmp_path):
    """A checkpoint of the small model (4 experts, Adam) after two steps: its weights differ from
    the name-seeded initialisation (the first step runs at the warmup's lr 0), so a load that
    wrote some tensors before failing would show."""
    cfg = small_config()
    init_parallel(cfg)
    run = build_run(cfg)
    train_step(run, 0)
    train_step(run, 1)
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


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_tensor_files_are_named(saved, damage):
    """A truncated or missing ``.distcp`` (the marker intact): a CheckpointError naming the
    checkpoint and the cause, not a bare EOFError/FileNotFoundError from inside DCP."""
    distcp = sorted(saved.glob("*.distcp"))[0]
    if damage == "truncated":
        distcp.write_bytes(distcp.read_bytes()[:100])
    else:
        distcp.unlink()
    run = build_run(small_config())
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_checkpoint(saved, model=run.ddp, optimizer=run.opt, scheduler=run.sched)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {saved}: cannot read its tensors ("), msg
    assert msg.endswith("its files are corrupt or incomplete (an earlier complete checkpoint, "
                        "if any, is in the same folder)"), msg


def test_weights_of_another_model_shape_through_the_conversion_loader(saved):
    """``load_model_weights`` (``train.init_checkpoint`` of a converted checkpoint) checks the
    shapes first like ``load_checkpoint`` (it used to end in megatron's CheckpointingException,
    naming no checkpoint)."""
    from vp2o.convert import load_model_weights

    other = build_run(small_config(extra=["model.num_experts=8"]))
    with pytest.raises(ck.CheckpointError) as e:
        load_model_weights(other.model, saved)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {saved} does not fit this model: tensor "), msg
    assert "has shape (2, 4, 64) in the checkpoint, this model needs (2, 8, 64)" in msg, msg
    same = build_run(small_config())
    initial = global_params(same)
    load_model_weights(same.model, saved)  # the fitting model loads: its weights change
    loaded = global_params(same)
    assert any(not torch.equal(loaded[n], initial[n]) for n in initial)
