"""Files that are whole or absent: what every vp2o writer of a result uses.

A reader (``vp2o report``, ``study.py --resume``, a resumed run, another rank) must never see
half of a file that a crash, a kill or a full disk interrupted. ``write_text_atomic`` writes a
hidden sibling, flushes it to disk and renames it over the target (a rename within a folder is
atomic on POSIX file systems), so the target holds either its old contents or the new ones;
``atomic_directory`` does the same for a folder built file by file.

A leaf: it imports nothing from vp2o, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _sibling(path: Path, tag: str) -> Path:
    """A hidden name next to ``path`` that no other writer picks (pid and a random part)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / file system
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Replace ``path``'s contents with ``text`` all at once; its parent folders are created.

    On any failure (including an interrupt) the old file is left as it was and the temporary
    sibling is removed. The new file gets the usual permissions (the process umask), not the
    owner-only ones of ``tempfile.mkstemp``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "part")
    try:
        with open(tmp, "x", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def can_take_folder(out: str | os.PathLike) -> bool:
    """Whether ``out`` may receive a folder: it does not exist, or is an empty folder."""
    out = Path(out)
    return not out.exists() or (out.is_dir() and not any(out.iterdir()))


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling folder to fill, renamed to ``out`` when the block ends without an
    exception and removed when it raises.

    ``out`` must not exist, or be an empty folder (which is replaced); anything else raises
    ``FileExistsError`` before the block runs."""
    out = Path(out)
    if not can_take_folder(out):
        raise FileExistsError(f"{out}: already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "partial")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
