"""vp2o.files: a result file or folder is whole or absent, whatever interrupts its writer."""

from __future__ import annotations

import os
import stat

import pytest

from vp2o import files


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_text_atomic_replaces_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "eval.json"
    assert files.write_text_atomic(target, "old\n") == target  # parent folders are created
    files.write_text_atomic(target, "néw\n")
    assert target.read_text(encoding="utf-8") == "néw\n"
    assert _entries(target.parent) == ["eval.json"]


def test_write_text_atomic_gives_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = files.write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0o600


@pytest.mark.parametrize("where", ["write", "rename"])
def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch, where):
    target = tmp_path / "metrics.jsonl"
    target.write_text("line 1\nline 2\n")

    class Interrupted(BaseException):  # like KeyboardInterrupt: not an Exception
        pass

    def fail(*args, **kwargs):
        raise Interrupted

    # "write": the flush to disk fails after the temporary file was written
    monkeypatch.setattr(files.os, "replace" if where == "rename" else "fsync", fail)
    with pytest.raises(Interrupted):
        files.write_text_atomic(target, "new\n")
    assert target.read_text() == "line 1\nline 2\n"
    assert _entries(tmp_path) == ["metrics.jsonl"]  # the temporary sibling is gone


def test_atomic_directory_appears_whole(tmp_path):
    out = tmp_path / "hf"
    with files.atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not out.exists()  # nothing at the target while the folder is being filled
        assert tmp.parent == out.parent and tmp.name.startswith(".hf.partial-")
    assert _entries(out) == ["config.json"]
    assert _entries(tmp_path) == ["hf"]


def test_atomic_directory_replaces_an_empty_folder_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with files.atomic_directory(out) as tmp:
        (tmp / "a").write_text("a")
    assert _entries(out) == ["a"]
    with pytest.raises(FileExistsError, match="not an empty folder"):
        with files.atomic_directory(out):
            pytest.fail("the block must not run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        with files.atomic_directory(tmp_path / "file"):
            pass


def test_atomic_directory_failure_removes_the_partial_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with files.atomic_directory(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert _entries(tmp_path) == []
