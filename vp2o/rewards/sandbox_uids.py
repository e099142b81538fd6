"""Per-run unprivileged uids for the code sandbox (only when the caller is root).

Each sandboxed run gets a uid of its own from a reserved pool (60000-60063 by default, as the
`isolate` sandbox does), held through an exclusive `flock` on a root-only lock file, so concurrent
runs in this or other processes never share one. That buys two things a single shared "nobody"
cannot give:

- `RLIMIT_NPROC` counts the processes of one run only, so a fork bomb cannot starve the runs beside
  it;
- after the run, `kill -KILL -1` executed *as that uid* reaches every process the run left behind,
  also ones that detached into a new session or process group, and nothing else.

The uids need no /etc/passwd entry; they must be unused on the host (pick another range with
`Sandbox(uids=...)` if they are not).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["DEFAULT_UIDS", "kill_uid", "uid_slot"]

logger = logging.getLogger(__name__)

DEFAULT_UIDS = tuple(range(60000, 60064))
"""The reserved uid pool; each run uses one uid as both its uid and gid."""

_ACQUIRE_TIMEOUT_S = 120.0


def _lock_dir() -> Path:
    """A directory for the lock files that only the caller can write (root-owned, not shared)."""
    for candidate in (Path("/run/vp2o-sandbox-uids"), Path(tempfile.gettempdir()) / "vp2o-uids"):
        try:
            candidate.mkdir(mode=0o700, exist_ok=True)
            info = candidate.lstat()
        except OSError:
            continue
        if (
            candidate.is_dir()
            and not candidate.is_symlink()
            and info.st_uid == os.geteuid()
            and not info.st_mode & 0o022
        ):
            return candidate
    return Path(tempfile.mkdtemp(prefix="vp2o-uids-"))  # private: no cross-process coordination


def kill_uid(uid: int) -> None:
    """SIGKILL every process whose real or saved uid is `uid` (runs `kill -KILL -1` as `uid`)."""
    kill = shutil.which("kill") or "/bin/kill"
    try:
        subprocess.run(
            [kill, "-9", "--", "-1"],
            user=uid,
            group=uid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
        return
    except (OSError, subprocess.SubprocessError) as err:
        logger.debug("kill -1 as uid %d failed (%s); scanning /proc", uid, err)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uids = next(
            (line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")), []
        )
        if str(uid) in uids:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


@contextlib.contextmanager
def uid_slot(uids: Sequence[int]) -> Iterator[int | None]:
    """Hold one uid of `uids` for the duration of a run; kill its processes on exit.

    Yields None (no uid drop) when `uids` is empty.

    Raises:
        TimeoutError: If no uid frees up within two minutes.
    """
    if not uids:
        yield None
        return
    lock_dir = _lock_dir()
    order = list(uids)
    random.shuffle(order)  # spread reuse, so zombies of a killed run are reaped before reuse
    deadline = time.monotonic() + _ACQUIRE_TIMEOUT_S
    while True:
        for uid in order:
            fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                kill_uid(uid)  # a crashed earlier holder may have left processes behind
                yield uid
            finally:
                kill_uid(uid)
                os.close(fd)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"all {len(order)} sandbox uids stayed busy")
        time.sleep(0.05)
