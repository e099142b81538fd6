"""Run untrusted Python source in a separate, limited process (used by the `code` reward).

Two backends, picked once per configuration (`backend="auto"`):

- `bwrap` (bubblewrap): a fresh mount namespace whose root holds only read-only binds of `/usr`
  (with the `/bin`, `/lib*` links), the interpreter's prefix and `/etc/ld.so.cache`; a new `/proc`
  and minimal `/dev`; a size-capped tmpfs `/tmp` (the working directory); the program itself
  read-only at `/sandbox/main.py`. New network (its own loopback only), PID, IPC and UTS namespaces,
  `--new-session`, `--die-with-parent`. The caller's files, home and run directory are simply not
  there.
- `rlimit`: the same process limits without namespaces, in a fresh temporary working directory.
  Used when bwrap is missing or does not work here (logged once); it cannot hide the file system
  or the network, see docs/rewards.md.

In both, a small trusted launcher (`_LAUNCHER`) runs first in the child: it sets `RLIMIT_CPU`,
`RLIMIT_AS`, `RLIMIT_NPROC`, `RLIMIT_FSIZE`, `RLIMIT_NOFILE`, `RLIMIT_CORE=0`, sets
`PR_SET_NO_NEW_PRIVS`, drops to an unprivileged uid/gid of its own (a per-run uid from a reserved
pool, see `sandbox_uids`) with no supplementary groups when it runs as root, and `exec`s
`python -I -B /path/main.py`. The parent enforces a wall-clock deadline, reads at most
`output_bytes` of stdout (stderr is discarded), and always SIGKILLs the whole process group at the
end (with bwrap, killing bwrap tears down the PID namespace and everything in it); as root it then
also kills every process left with the run's uid.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vp2o.rewards.sandbox_uids import DEFAULT_UIDS, uid_slot

__all__ = ["RunResult", "Sandbox", "SandboxLimits"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "bwrap", "rlimit"]
Status = Literal["ok", "error", "timeout", "output_limit", "sandbox_error"]

_INSIDE_PROGRAM = "/sandbox/main.py"
# Tried in the rlimit backend when the sandbox uids cannot run our interpreter (e.g. under /root).
_SYSTEM_PYTHONS = [p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)]
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

# Trusted code run by the sandbox's own interpreter before the untrusted program replaces it.
_LAUNCHER = """\
import ctypes, json, os, resource, sys
c = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (c["cpu"], c["cpu"] + 1))
for name, value in (("AS", c["as"]), ("FSIZE", c["fsize"]), ("NOFILE", c["nofile"]),
                    ("CORE", 0), ("NPROC", c["nproc"])):
    resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
try:
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
except Exception:
    pass
if os.geteuid() == 0 and c["uid"] >= 0:
    os.setgroups([])
    os.setgid(c["gid"])
    os.setuid(c["uid"])
os.execv(c["python"], [c["python"], "-I", "-B", c["prog"]])
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    Attributes:
        cpu_s: CPU-time limit (RLIMIT_CPU, rounded up to whole seconds; SIGXCPU then SIGKILL).
        wall_s: Wall-clock limit, enforced by the parent (catches sleeping and blocked programs).
        memory_mb: Address-space limit (RLIMIT_AS) of each process, in MiB.
        nproc: Process/thread limit (RLIMIT_NPROC); counts every process of the sandbox uid.
        file_size_mb: Largest file the program may write (RLIMIT_FSIZE), in MiB.
        tmpfs_mb: Size of the writable tmpfs `/tmp` under bwrap, in MiB.
        output_bytes: Most stdout bytes captured; a program printing more fails.
        open_files: File-descriptor limit (RLIMIT_NOFILE).
    """

    cpu_s: float = 2.0
    wall_s: float = 6.0
    memory_mb: int = 1024
    nproc: int = 16
    file_size_mb: int = 16
    tmpfs_mb: int = 64
    output_bytes: int = 1 << 20
    open_files: int = 64

    def __post_init__(self) -> None:
        for name in ("cpu_s", "wall_s", "memory_mb", "nproc", "file_size_mb", "tmpfs_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)}")
        if self.output_bytes < 1 or self.open_files < 8:
            raise ValueError("SandboxLimits needs output_bytes >= 1 and open_files >= 8")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed run.

    Attributes:
        status: "ok" (exit status 0), "error" (non-zero exit or killed by a limit), "timeout"
            (wall-clock limit), "output_limit" (stdout too long) or "sandbox_error" (could not
            start).
        returncode: Exit status as `subprocess` reports it (negative: killed by that signal),
            None if the program could not be started.
        stdout: Captured standard output (UTF-8, undecodable bytes replaced).
        wall_s: Seconds from start to end.
    """

    status: Status
    returncode: int | None
    stdout: str
    wall_s: float

    @property
    def ok(self) -> bool:
        """Whether the program exited with status 0 within the limits."""
        return self.status == "ok"


def _interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _bwrap_command(
    bwrap: str, python: str, program: Path, limits: SandboxLimits, launcher_args: str
) -> list[str]:
    cmd = [
        bwrap,
        "--die-with-parent",
        "--new-session",
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    cmd += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    prefix = os.path.dirname(os.path.dirname(python))
    if not any(prefix == r or prefix.startswith(r + "/") for r in ("/usr", "/bin", "/lib")):
        parts = Path(prefix).parts
        for i in range(2, len(parts)):
            cmd += ["--perms", "0755", "--dir", str(Path(*parts[:i]))]
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777"]
    if _bwrap_has_size(bwrap):  # bubblewrap >= 0.7; older ones get an uncapped tmpfs
        cmd += ["--size", str(limits.tmpfs_mb << 20)]
    cmd += ["--tmpfs", "/tmp"]
    cmd += ["--perms", "0755", "--dir", "/sandbox", "--ro-bind", str(program), _INSIDE_PROGRAM]
    cmd += ["--chdir", "/tmp", "--setenv", "HOME", "/tmp"]
    cmd += ["--", python, "-I", "-c", _LAUNCHER, launcher_args]
    return cmd


@functools.cache
def _bwrap_has_size(bwrap: str) -> bool:
    try:
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--size" in usage.stdout + usage.stderr


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


_RESOLVE_LOCK = threading.Lock()  # module-level: a Sandbox stays picklable


class Sandbox:
    """Runs Python source under limits; see the module docstring for the two backends.

    Args:
        limits: Resource limits of every run.
        backend: "bwrap", "rlimit" or "auto" (bwrap when it works here, else rlimit, logged once).
        uids: Pool of unprivileged uids, one per concurrent run, used when the caller is root
            (see `sandbox_uids`); empty: never drop privileges.
        python: Interpreter for the untrusted program (default: the base interpreter of this one;
            with the rlimit backend as root, a system python3 if the pool's uids cannot run it).
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        backend: Backend = "auto",
        uids: Sequence[int] = DEFAULT_UIDS,
        python: str | None = None,
    ) -> None:
        if backend not in ("auto", "bwrap", "rlimit"):
            raise ValueError(
                f"unknown sandbox backend {backend!r}; choose one of: auto, bwrap, rlimit"
            )
        self.limits = limits or SandboxLimits()
        self.python = os.path.realpath(python) if python else _interpreter()
        self.uids: tuple[int, ...] = tuple(uids) if os.geteuid() == 0 else ()
        self._explicit_python = python is not None
        self._backend: str | None = None if backend == "auto" else backend
        self._checked = False

    @property
    def backend(self) -> str:
        """The backend in use ("bwrap" or "rlimit"); resolving "auto" probes bwrap once.

        Thread-safe: runs started at once from several threads on a fresh sandbox resolve it
        once (before, each probed, and one could change ``python``/``uids`` under another's run).
        """
        if self._checked:
            return self._backend
        with _RESOLVE_LOCK:
            return self._resolve_backend()

    def _resolve_backend(self) -> str:
        if self._backend is None:
            bwrap = shutil.which("bwrap")
            usable = bwrap is not None and _probe("bwrap", self.python, self.uids)
            if not usable:
                _warn_once(
                    "bubblewrap "
                    + ("is not installed" if bwrap is None else f"at {bwrap} does not work here")
                    + "; the code sandbox falls back to rlimits only (no file-system or network "
                    "isolation). Install the 'bubblewrap' package to isolate untrusted code."
                )
            self._backend = "bwrap" if usable else "rlimit"
        if self._backend == "rlimit" and self.uids and not self._checked:
            candidates = [self.python] + ([] if self._explicit_python else _SYSTEM_PYTHONS)
            usable = [p for p in candidates if _probe("rlimit", p, self.uids)]
            if usable:
                self.python = usable[0]
            else:
                _warn_once(
                    f"the sandbox uids cannot run {self.python}; the rlimit sandbox keeps the "
                    "caller's uid (root). Put the interpreter where any user can read it."
                )
                self.uids = ()
        self._checked = True
        return self._backend

    def run(self, source: str, stdin: str = "") -> RunResult:
        """Run `source` as a Python program with `stdin` as its standard input.

        Never raises for anything the program does; failures to start give "sandbox_error".
        """
        backend = self.backend
        start = time.monotonic()
        try:
            with uid_slot(self.uids) as uid:
                return _run_once(backend, self.python, self.limits, uid, source, stdin)
        except (OSError, TimeoutError) as err:
            logger.warning("sandbox could not run: %s", err)
            return RunResult("sandbox_error", None, "", time.monotonic() - start)


def _run_once(
    backend: str,
    python: str,
    limits: SandboxLimits,
    uid: int | None,
    source: str,
    stdin: str,
) -> RunResult:
    """One run in a fresh temporary directory; `uid` None keeps the caller's uid."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vp2o-sandbox-", ignore_cleanup_errors=True) as tmp:
        job = Path(tmp)
        program = job / "main.py"
        program.write_text(source, encoding="utf-8", errors="replace")
        program.chmod(0o644)
        stdin_path = job / "stdin.txt"
        stdin_path.write_text(stdin, encoding="utf-8", errors="replace")
        work = job / "work"
        work.mkdir()
        if uid is not None:
            os.chmod(job, 0o755)
            os.chown(work, uid, uid)
        launcher_args = json.dumps(
            {
                "cpu": max(1, math.ceil(limits.cpu_s)),
                "as": limits.memory_mb << 20,
                "fsize": limits.file_size_mb << 20,
                "nofile": limits.open_files,
                "nproc": limits.nproc,
                "uid": -1 if uid is None else uid,
                "gid": -1 if uid is None else uid,
                "python": python,
                "prog": _INSIDE_PROGRAM if backend == "bwrap" else str(program),
            }
        )
        if backend == "bwrap":
            bwrap = shutil.which("bwrap") or "bwrap"
            cmd = _bwrap_command(bwrap, python, program, limits, launcher_args)
            env = dict(_ENV, HOME="/tmp")
        else:
            cmd = [python, "-I", "-c", _LAUNCHER, launcher_args]
            env = dict(_ENV, HOME=str(work), TMPDIR=str(work))
        try:
            with open(stdin_path, "rb") as stdin_file:
                proc = subprocess.Popen(
                    cmd,
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    cwd=work,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as err:
            logger.warning("sandbox could not start: %s", err)
            return RunResult("sandbox_error", None, "", time.monotonic() - start)
        try:
            status, out = _collect(proc, start + limits.wall_s, limits.output_bytes)
        finally:
            _kill_group(proc)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if status == "ok" and proc.returncode != 0:
            status = "error"
        text = out.decode("utf-8", errors="replace")
        return RunResult(status, proc.returncode, text, time.monotonic() - start)


def _collect(proc: subprocess.Popen, deadline: float, limit: int) -> tuple[Status, bytes]:
    """Read stdout until EOF and exit, the deadline, or more than `limit` bytes.

    A program that exits while a child it started still holds stdout open counts as finished once
    the pipe has nothing more to read (the child is killed with the process group afterwards).
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    poller = select.poll()  # not select.select: it fails for descriptors >= 1024
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    total = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", b"".join(chunks)
        if not poller.poll(max(1, int(min(remaining, 0.05) * 1000))):
            # Main process gone and the pipe idle: a leftover child holds it. Polled again after
            # the exit is seen: output written just before exiting arrives between the two.
            if proc.poll() is not None and not poller.poll(0):
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            return "output_limit", b"".join(chunks)
        chunks.append(chunk)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "timeout", b"".join(chunks)
    return "ok", b"".join(chunks)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


@functools.cache
def _probe(backend: str, python: str, uids: tuple[int, ...]) -> bool:
    """Whether `backend` can run a trivial program here (cached per configuration)."""
    limits = SandboxLimits(cpu_s=5, wall_s=20)
    try:
        with uid_slot(uids) as uid:
            result = _run_once(backend, python, limits, uid, "print('sandbox-ok')", "")
    except (OSError, TimeoutError) as err:
        logger.debug("sandbox probe %s failed: %s", backend, err)
        return False
    if result.stdout.strip() != "sandbox-ok":
        logger.debug(
            "sandbox probe %s failed: %s, rc %s", backend, result.status, result.returncode
        )
        return False
    return True
