"""Checkpoints under faults: a kill mid-save, a full disk, an unwritable directory, half-written
and marker-less directories, pruning. The previous checkpoint always survives and loads."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from ckpt_helpers import build_run, global_params, run_worker, small_config, train_step

from vp2o.mcore import checkpoint as ck
from vp2o.mcore.checkpoint import save_load


def save(run, root, step, **kw):
    return ck.save_checkpoint(
        root,
        step,
        model=run.ddp,
        optimizer=run.opt,
        scheduler=run.sched,
        extra={"step": step},
        **kw,
    )


def entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def assert_loads(path, cfg, want_params) -> None:
    """``path`` loads into a fresh run and gives ``want_params``, which a fresh run does not
    have (else a load that read nothing would pass)."""
    fresh = build_run(cfg)
    assert any(not torch.equal(value, want_params[name])
               for name, value in global_params(fresh).items()), "want_params are the initial ones"
    extra = ck.load_checkpoint(path, model=fresh.ddp, optimizer=fresh.opt, scheduler=fresh.sched)
    assert extra["step"] == int(path.name.split("_")[1])
    for name, value in global_params(fresh).items():
        assert torch.equal(value, want_params[name]), name


@pytest.fixture
def fresh(init_parallel):
    """(cfg, run): the small model with its optimizer, untrained."""
    cfg = small_config()
    init_parallel(cfg)
    return cfg, build_run(cfg)


@pytest.fixture
def trained(fresh):
    """(cfg, run) after two training steps (the optimizer has state to save; the first step runs
    at the warmup's learning rate 0, so only the second moves the weights)."""
    train_step(fresh[1], 0)
    train_step(fresh[1], 1)
    return fresh


def test_keep_last_prunes_to_the_newest(fresh, tmp_path):
    cfg, run = fresh
    for step in (1, 2, 3, 4):
        save(run, tmp_path, step, keep_last=2)
    assert entries(tmp_path) == ["step_00000003", "step_00000004"]
    save(run, tmp_path, 5)  # keep_last=None keeps everything
    assert entries(tmp_path) == ["step_00000003", "step_00000004", "step_00000005"]
    save(run, tmp_path, 5, keep_last=1)  # the same step again replaces it
    assert entries(tmp_path) == ["step_00000005"]
    assert ck.read_marker(tmp_path / "step_00000005")["world_size"] == 1


def test_pruning_keeps_checkpoints_another_loop_wrote(fresh, tmp_path):
    """With extra["kind"], keep_last counts and deletes that kind only: vp2o sft (keep_last=1)
    saved into a folder of vp2o train checkpoints used to delete them all."""
    cfg, run = fresh

    def save_kind(step, kind, keep_last):
        return ck.save_checkpoint(tmp_path, step, model=run.ddp, optimizer=run.opt,
                                  scheduler=run.sched, extra={"step": step, "kind": kind},
                                  keep_last=keep_last)

    for step in (1, 2, 3):
        save_kind(step, "train", keep_last=2)
    assert entries(tmp_path) == ["step_00000002", "step_00000003"]
    save_kind(10, "sft", keep_last=1)
    assert entries(tmp_path) == ["step_00000002", "step_00000003", "step_00000010"]
    save_kind(4, "train", keep_last=2)
    assert entries(tmp_path) == ["step_00000003", "step_00000004", "step_00000010"]
    kinds = [ck.checkpoint_kind(tmp_path / e) for e in entries(tmp_path)]
    assert kinds == ["train", "train", "sft"]
    assert ck.read_marker(tmp_path / "step_00000010")["kind"] == "sft"
    others = ck.checkpoints_of_other_kinds(tmp_path, "train")
    assert others == [(tmp_path / "step_00000010", "sft")]


def test_kind_of_a_checkpoint_saved_before_markers_carried_it(fresh, tmp_path):
    """Older markers have no "kind": it is read from the trainer state (vp2o train's extra has
    data_position, vp2o sft's has kind), and unknown stays None (never pruned by a kind)."""
    cfg, run = fresh
    for step, extra in ((1, {"step": 1, "data_position": 7}), (2, {"step": 2, "kind": "sft"}),
                        (3, {"step": 3})):
        path = ck.save_checkpoint(tmp_path, step, model=run.ddp, optimizer=run.opt,
                                  scheduler=run.sched, extra=extra)
        marker = json.loads((path / ck.MARKER).read_text())
        marker.pop("kind")
        (path / ck.MARKER).write_text(json.dumps(marker))
    kinds = [ck.checkpoint_kind(tmp_path / e) for e in entries(tmp_path)]
    assert kinds == ["train", "sft", None]
    ck.save_checkpoint(tmp_path, 4, model=run.ddp, optimizer=run.opt, scheduler=run.sched,
                       extra={"step": 4, "kind": "train"}, keep_last=1)
    assert entries(tmp_path) == ["step_00000002", "step_00000003", "step_00000004"]


def test_latest_ignores_half_written_and_markerless_dirs(trained, tmp_path):
    cfg, run = trained
    good = save(run, tmp_path, 1)
    marker = json.loads((good / ck.MARKER).read_text())
    assert marker["step"] == 1 and marker["layout"]["expert_parallel"] == 1
    # A complete-looking save that was never renamed into place, marker included.
    shutil.copytree(good, tmp_path / ".tmp_step_00000009")
    # A half-written checkpoint: megatron's files, some RNG states, no marker.
    half = tmp_path / "step_00000005"
    shutil.copytree(good, half)
    (half / ck.MARKER).unlink()
    (half / "trainer_state.pt").unlink()
    # Markers that do not parse, or that name another step.
    bad = tmp_path / "step_00000006"
    shutil.copytree(good, bad)
    (bad / ck.MARKER).write_text('{"step": ')
    other = tmp_path / "step_00000007"
    shutil.copytree(good, other)
    (other / ck.MARKER).write_text(json.dumps({**marker, "step": 1}))
    (tmp_path / "step_00000008").write_text("a file, not a directory")
    (tmp_path / "step_00000010").mkdir()  # empty

    assert ck.latest_checkpoint(tmp_path) == good
    assert ck.latest_checkpoint(tmp_path / "missing") is None
    fresh = build_run(cfg)
    for path, words in [
        (half, ["incomplete", "complete.json"]),
        (bad, ["unreadable"]),
        (other, ["names step 1"]),
        (tmp_path / "step_00000042", ["does not exist"]),
    ]:
        with pytest.raises(ck.CheckpointError) as e:
            ck.load_checkpoint(path, model=fresh.ddp, optimizer=fresh.opt, scheduler=fresh.sched)
        assert str(path) in str(e.value) and all(w in str(e.value) for w in words), e.value
    # The next save clears the leftover temporary directory; odd directories stay untouched.
    save(run, tmp_path, 2)
    assert ".tmp_step_00000009" not in entries(tmp_path)
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_00000002"


def test_sigkill_mid_save_keeps_the_previous_checkpoint(trained, tmp_path):
    """A process killed (SIGKILL, with megatron's writer processes) after the marker but before
    the rename: the previous checkpoint stays the latest and loads; the next save clears the
    debris. (Killed while writing: tests/reliability/test_trainer_signals.py, through the
    trainer.)"""
    cfg, run = trained
    first = save(run, tmp_path, 1)
    want = global_params(run)
    for step, at in ((3, "rename"),):
        proc = run_worker(0, "kill", "--root", str(tmp_path), "--step", str(step), "--at", at)
        assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-4000:]
        debris = tmp_path / f".tmp_step_{step:08d}"
        assert entries(tmp_path) == [debris.name, "step_00000001"]
        assert (debris / "metadata.json").is_file()  # megatron's files were written
        assert (debris / ck.MARKER).is_file() == (at == "rename")
        assert ck.latest_checkpoint(tmp_path) == first
    assert_loads(first, cfg, want)
    save(run, tmp_path, 4, keep_last=2)
    assert entries(tmp_path) == ["step_00000001", "step_00000004"]


def test_disk_full_real(trained, tmp_path, tmpfs):
    """A real ENOSPC (a 3.5 MB tmpfs holds one checkpoint of the small model, not two)."""
    cfg, run = trained
    root = tmpfs.mount(3500)
    first = save(run, root, 1)
    want = global_params(run)
    with pytest.raises(ck.CheckpointError) as e:
        save(run, root, 2)
    msg = str(e.value)
    assert str(root / "step_00000002") in msg and "No space left on device" in msg, msg
    assert "file system is full" in msg and "MiB are free" in msg, msg
    assert entries(root) == ["step_00000001"]  # temporary directory removed
    assert ck.latest_checkpoint(root) == first
    assert_loads(first, cfg, want)


def test_disk_full_injected(trained, tmp_path, monkeypatch):
    """ENOSPC raised inside the model/optimizer write, after a partial file (no privileges)."""
    cfg, run = trained
    first = save(run, tmp_path, 1)
    want = global_params(run)

    def full(sharded_state_dict, directory):
        (directory / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "__0_0.distcp"))

    monkeypatch.setattr(save_load, "_dist_save", full)
    with pytest.raises(ck.CheckpointError) as e:
        save(run, tmp_path, 2)
    msg = str(e.value)
    assert str(tmp_path / "step_00000002") in msg and "No space left on device" in msg, msg
    assert "file system is full" in msg and "were not touched" in msg, msg
    assert entries(tmp_path) == ["step_00000001"]
    assert_loads(first, cfg, want)


def test_unwritable_root(fresh, tmp_path, tmpfs):
    cfg, run = fresh
    # A root that cannot be created at all (its parent is a file).
    (tmp_path / "file").write_text("x")
    with pytest.raises(ck.CheckpointError) as e:
        save(run, tmp_path / "file" / "ckpt", 1)
    assert str(tmp_path / "file" / "ckpt") in str(e.value) and "Not a directory" in str(e.value)
    # A read-only file system holding a checkpoint: the error names it, the checkpoint loads.
    train_step(run, 0)
    train_step(run, 1)  # step 0 runs at the warmup's lr 0
    root = tmpfs.mount(8192)
    first = save(run, root, 1)
    want = global_params(run)
    tmpfs.remount_ro(root)
    with pytest.raises(ck.CheckpointError) as e:
        save(run, root, 2)
    msg = str(e.value)
    assert str(root / "step_00000002") in msg and "Read-only file system" in msg, msg
    assert "not writable" in msg, msg
    assert entries(root) == ["step_00000001"]
    assert_loads(first, cfg, want)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(trained, tmp_path):
    cfg, run = trained
    first = save(run, tmp_path, 1)
    want = global_params(run)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ck.CheckpointError) as e:
            save(run, tmp_path, 2)
        assert str(tmp_path) in str(e.value) and "Permission denied" in str(e.value)
    finally:
        tmp_path.chmod(0o755)
    assert entries(tmp_path) == ["step_00000001"]
    assert_loads(first, cfg, want)


def test_unstorable_extra_fails_before_writing(fresh, tmp_path):
    cfg, run = fresh
    with pytest.raises(TypeError, match=r"extra\['cfg'\] is a Config"):
        ck.save_checkpoint(
            tmp_path, 1, model=run.ddp, optimizer=run.opt, scheduler=run.sched, extra={"cfg": cfg}
        )
    assert entries(tmp_path) == []


def test_killed_while_replacing_the_same_step_recovers(fresh, tmp_path):
    """Killed between moving the old ``step_N`` aside and renaming the new one into place: a
    resume puts the old one back before it looks (a resume from step 1 would redo two steps),
    and the next save removes the unfinished new one; without a resume the next save puts it
    back. ``latest_checkpoint`` itself only reads."""
    cfg, run = fresh
    save(run, tmp_path, 1)
    three = save(run, tmp_path, 3)
    for lookup in (True, False):
        three.rename(tmp_path / ".old_step_00000003")
        shutil.copytree(tmp_path / ".old_step_00000003", tmp_path / ".tmp_step_00000003")
        assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
        if lookup:
            ck.recover_replaced(tmp_path)
            assert ck.latest_checkpoint(tmp_path) == three
            assert entries(tmp_path) == [".tmp_step_00000003", "step_00000001", "step_00000003"]
        save(run, tmp_path, 4)
        assert entries(tmp_path) == ["step_00000001", "step_00000003", "step_00000004"]
        shutil.rmtree(tmp_path / "step_00000004")
