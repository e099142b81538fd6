"""`vp2o train` killed or signalled from outside (subprocesses, tiny config).

SIGKILL while a checkpoint is being written, SIGTERM (checkpoint, exit 0,
resume), the checkpoint directory becoming unwritable mid-run, and a rank that dies in a
2-process torchrun job. The checkpoint-level versions (SIGKILL of the saving process, ENOSPC,
read-only directories) are in tests/checkpoint/test_faults.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from rel_helpers import checkpoint_tensors, popen_train, run_train, trainer_extra

from vp2o.mcore.checkpoint import MARKER, latest_checkpoint
from vp2o.metrics import read_metrics

pytestmark = pytest.mark.slow
STEPS = 8


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``path`` exists and is not empty: a writer creates the file before it writes, so
    a file that merely exists may still be empty (a pid read as '' once, under load)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"trainer exited ({proc.returncode}) early:\n{out[-2000:]}\n{err[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {path}")
        time.sleep(0.01)


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    """Killed (the whole process group, as a scheduler does) after megatron wrote checkpoint 3's
    files into its temporary directory: checkpoint 2 stays the latest and a `resume: auto` run
    continues from it; a marker-less `step_*` directory is never taken for a checkpoint."""
    run, ckpts, ready = tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "ready"
    args = [f"train.run_dir={run}", "train.steps=6", "train.save_every=1", "train.keep_last=3"]
    proc = popen_train("--pause-save", "3", "--ready", str(ready), train_args=args)
    _wait_for(ready, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [".tmp_step_00000003", "step_00000001", "step_00000002"], names
    debris = ckpts / ".tmp_step_00000003"
    assert (debris / "metadata.json").is_file() and not (debris / MARKER).exists()
    assert latest_checkpoint(ckpts) == ckpts / "step_00000002"
    # A half-written directory under a checkpoint's name (no marker) is not taken either.
    shutil.copytree(debris, ckpts / "step_00000009")
    assert latest_checkpoint(ckpts) == ckpts / "step_00000002"

    resumed = run_train(train_args=[*args[:1], "train.steps=4", "train.save_every=1",
                                    "train.keep_last=3"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert _steps(run) == [0, 1, 2, 3]
    assert "step 2 |" in resumed.stdout and "step 1 |" not in resumed.stdout  # resumed at 2
    assert not debris.exists()  # the next save cleared the debris
    assert latest_checkpoint(ckpts) == ckpts / "step_00000004"
    assert trainer_extra(ckpts / "step_00000004")["step"] == 4


def test_stop_signal_checkpoints_exits_0_and_resume_continues(tmp_path):
    """SIGTERM arrives during step >= 2; the trainer finishes the step, checkpoints (with the
    prompt stream's position), exits 0, and the resumed run starts at that step. (That a resume
    reproduces the uninterrupted run bit for bit is tests/e2e/test_train.py's resume test;
    SIGUSR1, the same handler, is sent through the launcher in tests/e2e/test_scaleout.py.)"""
    run = tmp_path / "run"
    args = [f"train.steps={STEPS}", f"train.run_dir={run}"]
    proc = popen_train("--dump", str(tmp_path / "dump"), train_args=args)
    _wait_for(tmp_path / "dump" / "rollout_0002_rank0.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    stopped = int(re.search(r"stopped at step (\d+) \(checkpoint written\)", out).group(1))
    assert 3 <= stopped < STEPS
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt == run / "checkpoints" / f"step_{stopped:08d}"
    extra = trainer_extra(ckpt)
    assert extra["step"] == stopped and extra["prompts"]["consumed"] == 4 * stopped
    assert _steps(run) == list(range(stopped))
    resumed = run_train("--dump", str(tmp_path / "resumed"), train_args=args)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert _steps(run) == list(range(STEPS))
    assert sorted(p.name for p in (tmp_path / "resumed").glob("rollout_*"))[0] == (
        f"rollout_{stopped:04d}_rank0.pt"
    )


def test_unwritable_checkpoint_directory_fails_clearly(tmp_path, tmpfs):
    """The checkpoint directory (a tmpfs) turns read-only before step 2: the save of checkpoint 3
    fails with a CheckpointError naming the path and the cause; checkpoints 1 and 2 are intact
    and 2 is the latest."""
    run = tmp_path / "run"
    ckpts = tmpfs(run / "checkpoints")
    args = [f"train.run_dir={run}", "train.steps=5", "train.save_every=1"]
    proc = run_train("--remount-ro-at", "2", "--mount", str(ckpts), train_args=args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]  # the CLI's error exit
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vp2o: checkpoint error: could not save checkpoint"), last
    assert str(ckpts / "step_00000003") in proc.stderr
    assert "Read-only file system" in proc.stderr and "not writable" in proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001", "step_00000002"]
    # step 2 is logged before its checkpoint; a resume from step_00000002 drops that line
    assert _steps(run) == [0, 1, 2]
    # the last good checkpoint is whole: it loads (the resume after a failed save is the
    # SIGKILL test's)
    assert latest_checkpoint(ckpts) == ckpts / "step_00000002"
    assert trainer_extra(ckpts / "step_00000002")["step"] == 2
    assert checkpoint_tensors(ckpts / "step_00000002", tmp_path)


def test_a_dead_rank_ends_the_job_in_bounded_time(tmp_path):
    """torchrun, 2 ranks (EP=2); rank 1 is SIGKILLed mid-training. The job must end with an
    error within a bounded time (torchrun's agent stops the survivor), not hang."""
    dump = tmp_path / "dump"
    args = [f"train.run_dir={tmp_path / 'run'}", "train.steps=100000",
            "parallel.expert_parallel=2", "parallel.timeout_minutes=1"]
    proc = popen_train("--dump", str(dump), train_args=args, torchrun=2)
    try:
        _wait_for(dump / "rank1.pid", proc, timeout=240)
        _wait_for(dump / "rank0.pid", proc, timeout=60)
        survivor = int((dump / "rank0.pid").read_text())
        os.kill(int((dump / "rank1.pid").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=150)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"job ended {elapsed:.1f} s after the kill, exit {proc.returncode}")
    assert proc.returncode != 0, out[-2000:] + err[-4000:]
    assert elapsed < 90, elapsed
    assert not Path(f"/proc/{survivor}").exists() or _zombie(survivor)
    assert "exitcode  : -9" in err or "Signal 9" in err or "SIGKILL" in err, err[-4000:]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
