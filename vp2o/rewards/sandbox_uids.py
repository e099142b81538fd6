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
_REAP_WAIT_S = 2.0
"""How long a new holder waits for a uid's killed processes to be reaped when no uid is clean."""


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


def _processes_of(uid: int) -> list[int]:
    """Pids whose real, effective or saved uid is `uid` (zombies included: they still count)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uids = next(
            (line.split()[1:4] for line in status.splitlines() if line.startswith("Uid:")), []
        )
        if str(uid) in uids:
            pids.append(int(entry.name))
    return pids


def _wait_until_gone(uid: int, timeout_s: float) -> bool:
    """Whether every process of `uid` is gone (reaped) within `timeout_s` seconds.

    A SIGKILLed process counts against its uid's `RLIMIT_NPROC` until its parent reaps it; the
    next run on the same uid would find its process budget taken (a fork-bomb run leaves up to
    the limit behind, reaped by init at init's pace).
    """
    deadline = time.monotonic() + timeout_s
    while _processes_of(uid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


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
    for pid in _processes_of(uid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


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
    random.shuffle(order)  # spread reuse across the pool
    deadline = time.monotonic() + _ACQUIRE_TIMEOUT_S
    patient = False
    while True:
        # first pass: only uids whose earlier processes are all reaped; later passes take any
        # free uid, waiting a while for its leftovers (a pool whose every uid is still draining).
        for uid in order:
            fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            kill_uid(uid)  # a crashed earlier holder may have left processes behind
            if not _wait_until_gone(uid, _REAP_WAIT_S if patient else 0.0) and not patient:
                os.close(fd)
                continue
            try:
                yield uid
            finally:  # no wait for the reaping here: the next holder checks (the run's own
                kill_uid(uid)  # time would grow by init's reaping pace)
                os.close(fd)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"all {len(order)} sandbox uids stayed busy")
        patient = True
        time.sleep(0.05)
