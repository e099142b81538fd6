"""Bounded math-verify checks in worker processes.

math-verify bounds its own work with `signal.alarm`, which only works in the main thread, and a
signal cannot interrupt a long C call at all (sympy evaluating `10^{10^{10}}` sits in one
big-integer power). So each check runs in a child process (`_math_worker.py`) with a hard
deadline: on timeout the child is killed and a fresh one is started for the next check. This works
from any thread and from daemonic processes (it uses `subprocess`, not `multiprocessing`).

`MathVerifier` keeps up to `max_workers` children, so concurrent callers (a thread pool of reward
workers) run in parallel; children are started lazily and closed at interpreter exit.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import subprocess
import sys
import time
import weakref
from pathlib import Path

__all__ = ["MathVerifier"]

logger = logging.getLogger(__name__)

_WORKER_SCRIPT = Path(__file__).with_name("_math_worker.py")


class _Worker:
    """One child process speaking the line protocol of `_math_worker.py`."""

    def __init__(self, startup_timeout_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-P", str(_WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._buffer = b""
        if self.readline(time.monotonic() + startup_timeout_s) != "ready":
            self.close()
            raise RuntimeError("math-verify worker did not start")

    def readline(self, deadline: float) -> str | None:
        """Next line from the child, or None on EOF or when `deadline` passes."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            poller = select.poll()  # not select.select: it fails for descriptors >= 1024
            poller.register(fd, select.POLLIN)
            if not poller.poll(max(1, int(remaining * 1000))):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace").strip()

    def ask(self, request: dict, timeout_s: float) -> bool | None:
        """Send one check; True/False is the answer, None means timeout or a dead child."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except OSError:
            return None
        answer = self.readline(time.monotonic() + timeout_s)
        if answer not in ("0", "1"):
            return None
        return answer == "1"

    def close(self) -> None:
        """Kill the child and reap it."""
        _kill(self.proc)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.warning("math-verify worker %d did not exit after SIGKILL", proc.pid)


def _close_all(slots: queue.LifoQueue) -> None:
    while True:
        try:
            worker = slots.get_nowait()
        except queue.Empty:
            return
        if worker is not None:
            worker.close()


class MathVerifier:
    """Runs math-verify equivalence checks in child processes with a hard per-check deadline.

    Args:
        timeout_s: Wall-clock bound of one check (parse both sides and verify). On expiry the
            child is killed and the check counts as "not equivalent".
        max_workers: Most checks running at once (children kept alive between checks).
        startup_timeout_s: Bound on starting a child (importing sympy and math-verify).
    """

    def __init__(
        self, timeout_s: float = 5.0, max_workers: int = 4, startup_timeout_s: float = 60.0
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._slots: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(max_workers):
            self._slots.put(None)
        self.timeouts = 0
        """Checks that overran `timeout_s` (the child was killed), for logging."""
        weakref.finalize(self, _close_all, self._slots)

    def equivalent(self, gold: str, pred: str) -> bool:
        """Whether math-verify finds `pred` equivalent to `gold`; False on timeout or failure."""
        worker = self._slots.get()
        try:
            if worker is None:
                worker = _Worker(self.startup_timeout_s)
            inner = max(1, int(self.timeout_s / 3))
            answer = worker.ask(
                {"gold": gold, "pred": pred, "inner_timeout": inner}, self.timeout_s
            )
            if answer is None:
                self.timeouts += 1
                logger.warning(
                    "math-verify check exceeded %.1fs (or its worker died); scoring 0",
                    self.timeout_s,
                )
                worker.close()
                worker = None
                return False
            return answer
        finally:
            self._slots.put(worker)

    def close(self) -> None:
        """Stop all children (new ones start on the next check)."""
        workers = []
        while True:
            try:
                workers.append(self._slots.get_nowait())
            except queue.Empty:
                break
        for worker in workers:
            if worker is not None:
                worker.close()
            self._slots.put(None)
