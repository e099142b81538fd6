"""Checkpoint failures in words: the one exception they all become, and their causes.

A failed write or read names the checkpoint and the cause: the ``OSError`` behind it (strerror,
errno name and file), found also inside torch DCP's ``CheckpointException`` (whose own message is
a formatted traceback) and in the text DCP keeps of another rank's error; for a full or
unwritable file system a hint and the free space.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found, or loaded into this model."""


def describe(e: BaseException) -> str:
    """One line for the cause of ``e``: ``strerror (ERRNO): file`` of the OSError behind it,
    else the type and message of the first rank's exception inside DCP's wrapper."""
    os_error = find_os_error(e)
    if os_error is not None:
        name = f": {os_error.filename}" if os_error.filename else ""
        return f"{os.strerror(os_error.errno)} ({errno.errorcode.get(os_error.errno, '?')}){name}"
    e = dcp_cause(e)
    return f"{type(e).__name__}: {str(e).strip()}"


def dcp_cause(e: BaseException) -> BaseException:
    """The first rank's original exception inside torch DCP's ``CheckpointException`` (whose own
    message is a formatted traceback), else ``e``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for inner in failures.values():
            inner = inner[0] if isinstance(inner, tuple) and inner else inner
            if isinstance(inner, BaseException):
                return inner
    return e


def find_os_error(e: BaseException | None, depth: int = 0) -> OSError | None:
    """The OSError behind ``e``: itself, its cause/context, or inside torch DCP's failures."""
    if e is None or depth > 8:
        return None
    if isinstance(e, OSError) and e.errno is not None:
        return e
    for inner in getattr(e, "failures", {}).values():  # torch.distributed.checkpoint
        if isinstance(inner, tuple) and inner:  # (exception, traceback summary)
            inner = inner[0]
        found = find_os_error(inner if isinstance(inner, BaseException) else None, depth + 1)
        if found is not None:
            return found
    return find_os_error(e.__cause__ or e.__context__, depth + 1)


def rank_failure(failure: BaseException) -> tuple[str, int | None]:
    """This rank's failure as ``(description, errno or None)``: plain data, to be exchanged with
    the other ranks (``all_gather_object``) and turned into :func:`save_error` on each."""
    os_error = find_os_error(failure)
    text = describe(failure)
    code = os_error.errno if os_error is not None else None
    if code is None:  # torch DCP pickles worker errors across ranks: only the text survives
        found = re.search(r"\[Errno (\d+)\]", text)
        code = int(found.group(1)) if found else None
    if code is None and "unexpected pos" in text:
        # torch's zip writer (inline_container.cc) reports a short write this way: on a full
        # file system the ENOSPC itself is swallowed by its stream.
        code = errno.ENOSPC
        text += " (a short write: No space left on device, most likely)"
    return text, code


def save_error(
    final: Path, phase: str, tmp: Path, failed: list[tuple[int, tuple[str, int | None]]]
) -> CheckpointError:
    """The error every rank raises when ``failed`` (``(rank, rank_failure(...))`` of each rank
    that failed) could not do ``phase`` of saving checkpoint ``final``."""
    where = "; ".join(f"rank {r}: {msg}" for r, (msg, _) in failed)
    codes = {code for _, (_, code) in failed}
    return CheckpointError(
        f"could not save checkpoint {final} ({phase}, temporary directory {tmp}): {where}."
        f"{_hint(codes)}{_free_space(final.parent)} Existing checkpoints in {final.parent} were "
        "not touched."
    )


def _hint(codes: set) -> str:
    if codes & {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}:
        return " The file system is full (or a size limit was hit): free space or save elsewhere."
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
        return " The directory is not writable: fix its permissions or save elsewhere."
    return ""


def _free_space(root: Path) -> str:
    for path in (root, *root.parents):
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            continue
        return f" {free / 2**20:.1f} MiB are free on the file system of {path}."
    return ""
