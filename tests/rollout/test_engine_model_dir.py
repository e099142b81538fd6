"""The vLLM engine's temporary model folder (vp2o/engines.py, ``EngineModelDir``): removed by
``cleanup``, and, when its process was killed first, by the next engine's sweep; never while a
live process holds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from vp2o.engines import EngineModelDir, remove_stale_model_dirs

HOLDER = textwrap.dedent("""
    import sys, time
    from vp2o.engines import EngineModelDir
    d = EngineModelDir(sys.argv[1])
    print(d.name, flush=True)
    time.sleep(600)
""")


def test_cleanup_removes_the_folder_and_a_held_one_is_not_swept(tmp_path):
    d = EngineModelDir(str(tmp_path))
    path = Path(d.name)
    assert path.is_dir() and path.name.startswith(EngineModelDir.PREFIX)
    assert remove_stale_model_dirs(str(tmp_path)) == []  # this process holds it
    assert path.is_dir()
    d.cleanup()
    d.cleanup()  # idempotent
    assert not path.exists()


def test_a_killed_process_folder_is_removed_by_the_next_engine(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        held = Path(proc.stdout.readline().strip())
        assert held.is_dir()
        assert remove_stale_model_dirs(str(tmp_path)) == []  # alive: its lock is taken
        assert held.is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    assert held.is_dir()  # SIGKILL: no clean-up ran
    new = EngineModelDir(str(tmp_path))  # the next engine's folder sweeps the dead one
    try:
        assert not held.exists()
        assert Path(new.name).is_dir()
    finally:
        new.cleanup()


def test_the_sweep_leaves_what_it_cannot_judge(tmp_path):
    unmarked = tmp_path / f"{EngineModelDir.PREFIX}being_made"  # no mark: not locked yet
    unmarked.mkdir()
    (unmarked / "config.json").write_text("{}")
    other = tmp_path / "someone_else"
    other.mkdir()
    (other / EngineModelDir.MARK).touch()
    link = tmp_path / f"{EngineModelDir.PREFIX}link"
    os.symlink(other, link)
    stray = tmp_path / f"{EngineModelDir.PREFIX}file"
    stray.write_text("not a folder")
    assert remove_stale_model_dirs(str(tmp_path)) == []
    assert unmarked.is_dir() and other.is_dir() and link.is_symlink() and stray.is_file()
