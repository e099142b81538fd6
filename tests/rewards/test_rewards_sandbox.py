"""The code sandbox: limits on both backends, containment under bubblewrap."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from procs import live_pids

from vp2o.rewards import sandbox as sandbox_module
from vp2o.rewards.sandbox import Sandbox, SandboxLimits
from vp2o.rewards.sandbox_uids import DEFAULT_UIDS

# wall 10 s: a 0.08 s program took up to 3.1 s to start while the suite's multi-process tests ran
# beside it (docs/rewards.md); the CPU limit stops the busy programs, the sleep test has its own.
LIMITS = SandboxLimits(cpu_s=1, wall_s=10, memory_mb=512, nproc=32, output_bytes=1 << 16)
SHORT_WALL = dataclasses.replace(LIMITS, wall_s=2)


@pytest.fixture(scope="module")
def bwrap_sandbox():
    sandbox = Sandbox(LIMITS, backend="auto")
    if sandbox.backend != "bwrap":
        pytest.skip("bubblewrap is not usable here")
    return sandbox


@pytest.fixture(scope="module")
def rlimit_sandbox():
    return Sandbox(LIMITS, backend="rlimit")


@pytest.fixture(params=["bwrap", "rlimit"])
def any_sandbox(request):
    return request.getfixturevalue(f"{request.param}_sandbox")


def run(sandbox: Sandbox, source: str, stdin: str = ""):
    return sandbox.run(textwrap.dedent(source), stdin)


def test_echo(any_sandbox):
    result = run(any_sandbox, "print(input()[::-1])", "olleh\n")
    assert result.ok and result.stdout == "hello\n"


def test_infinite_loop_is_stopped(any_sandbox):
    start = time.monotonic()
    result = run(any_sandbox, "while True:\n    pass")
    assert result.status == "error"  # the CPU limit's signal, long before the wall clock's
    assert time.monotonic() - start < LIMITS.wall_s + 3


def test_sleep_hits_wall_clock(any_sandbox):
    short = Sandbox(SHORT_WALL, backend=any_sandbox.backend)
    start = time.monotonic()
    result = run(short, "import time\ntime.sleep(100)")
    assert result.status == "timeout"
    assert time.monotonic() - start < SHORT_WALL.wall_s + 3


def test_memory_limit(any_sandbox):
    result = run(any_sandbox, "x = bytearray(10 * 1024**3)\nprint('allocated')")
    assert not result.ok and "allocated" not in result.stdout


def test_output_limit(any_sandbox):
    start = time.monotonic()
    result = run(any_sandbox, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert result.status == "output_limit"
    assert len(result.stdout) <= LIMITS.output_bytes
    assert time.monotonic() - start < LIMITS.wall_s + 3


def test_file_size_limit(any_sandbox):
    source = """
    import os
    try:
        with open("big.bin", "wb") as f:
            f.write(b"x" * (64 << 20))
        print("wrote", os.path.getsize("big.bin"))
    except OSError as err:
        print("refused")
    """
    result = run(any_sandbox, source)
    assert "wrote 67108864" not in result.stdout


def test_fork_bomb_is_contained(any_sandbox, private_tmp):
    source = """
    import os
    for _ in range(10_000):
        try:
            os.fork()
        except OSError:
            pass
    while True:
        pass
    """
    start = time.monotonic()
    result = run(any_sandbox, source)
    assert not result.ok
    assert time.monotonic() - start < LIMITS.wall_s + 3
    time.sleep(0.5)
    assert live_pids(private_tmp) == []
    assert run(any_sandbox, "print('next run unaffected')").ok


def test_child_in_same_group_is_killed(any_sandbox):
    marker = "31.4159"
    result = run(any_sandbox, f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\n")
    assert result.ok
    time.sleep(0.3)
    assert live_pids(marker) == []


def test_environment_does_not_leak(any_sandbox, monkeypatch):
    monkeypatch.setenv("VP2O_TEST_SECRET", "hunter2")
    result = run(any_sandbox, "import os\nprint(os.environ.get('VP2O_TEST_SECRET'))")
    assert result.stdout.strip() == "None"


_KILL_THE_CALLER = """
import sys
from vp2o.rewards.sandbox import Sandbox, SandboxLimits
sandbox = Sandbox(SandboxLimits(cpu_s=1, wall_s=2, memory_mb=512, nproc=32), backend=sys.argv[1])
assert sandbox.backend == sys.argv[1]
result = sandbox.run("import os, signal\\nos.kill(os.getppid(), signal.SIGKILL)\\nprint('x')")
print("caller alive:", result.stdout.strip() or "-")
"""


def test_killing_the_parent_fails(any_sandbox):
    """The sandboxed code SIGKILLs its parent; the caller (a separate process here, so that a
    success shows as its death rather than pytest's) lives on and gets the run's result."""
    if any_sandbox.backend == "rlimit" and not any_sandbox.uids:
        pytest.skip("rlimit backend without a uid drop cannot protect its parent")
    caller = subprocess.run(
        [sys.executable, "-c", _KILL_THE_CALLER, any_sandbox.backend],
        capture_output=True, text=True, timeout=120,
    )
    assert caller.returncode == 0, (caller.returncode, caller.stderr[-2000:])
    assert caller.stdout.splitlines()[-1] in ("caller alive: -", "caller alive: x")


def test_drops_root(any_sandbox):
    if os.geteuid() != 0:
        pytest.skip("not running as root")
    result = run(any_sandbox, "import os\nprint(os.getuid(), os.getgid(), os.getgroups())")
    uid, gid, groups = result.stdout.split()
    assert int(uid) in DEFAULT_UIDS and gid == uid and groups == "[]"


def test_concurrent_runs_get_distinct_uids(any_sandbox):
    if not any_sandbox.uids:
        pytest.skip("no uid drop here")
    # Three interpreters start at once here: a roomier wall limit than LIMITS, so a loaded
    # machine cannot turn this uid test into a timing test.
    roomy = Sandbox(dataclasses.replace(LIMITS, wall_s=30, cpu_s=10), backend=any_sandbox.backend)
    outputs = []

    def work():
        outputs.append(run(roomy, "import os, time\ntime.sleep(0.5)\nprint(os.getuid())"))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in outputs), outputs
    assert len({r.stdout for r in outputs}) == 3, outputs


@pytest.mark.skipif(os.geteuid() != 0, reason="uids are probed only as root")
def test_first_use_from_several_threads_resolves_the_backend_once(monkeypatch):
    """Three threads starting runs on a fresh sandbox probe each candidate interpreter once
    (the lazy resolution is locked): before, every thread probed, and a probe that failed under
    load could switch the uids off under another thread's run."""
    calls = []

    def slow_probe(backend, python, uids):
        calls.append(python)
        time.sleep(0.2)  # long enough for the other threads to arrive
        return True

    monkeypatch.setattr(sandbox_module, "_probe", slow_probe)
    box = Sandbox(LIMITS, backend="rlimit", uids=(DEFAULT_UIDS[0],))
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(box.backend)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["rlimit"] * 3
    candidates = 1 + len(sandbox_module._SYSTEM_PYTHONS)
    assert len(calls) == candidates


def test_detached_child_is_killed(any_sandbox):
    if not any_sandbox.uids:
        pytest.skip("without a uid of its own a detached child can escape (documented)")
    marker = "16.1803"
    source = f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
    assert run(any_sandbox, source).ok
    time.sleep(0.3)
    assert live_pids(marker) == []


def test_writes_outside_are_refused(bwrap_sandbox, tmp_path):
    target_dir = tmp_path / "run_dir"
    target_dir.mkdir()
    os.chmod(tmp_path, 0o777)
    os.chmod(target_dir, 0o777)
    targets = [target_dir / "pwned", Path.cwd() / "pwned_by_sandbox", Path("/root/.ssh/pwned")]
    source = f"""
    for path in {[str(t) for t in targets]!r}:
        try:
            with open(path, "w") as f:
                f.write("x")
            print("WROTE", path)
        except OSError:
            print("refused")
    with open("/tmp/inside", "w") as f:
        f.write("own tmp is fine")
    print(open("/tmp/inside").read())
    """
    result = run(bwrap_sandbox, source)
    assert result.ok, result
    assert "WROTE" not in result.stdout
    assert "own tmp is fine" in result.stdout
    assert not any(t.exists() for t in targets)


def test_reads_outside_are_refused(bwrap_sandbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    source = f"""
    import os
    for path in [{str(secret)!r}, "/etc/passwd", "/root/.bashrc", {os.getcwd()!r}]:
        try:
            print(open(path).read()[:50] if os.path.isfile(path) else os.listdir(path))
        except OSError:
            print("refused")
    """
    result = run(bwrap_sandbox, source)
    assert "TOP-SECRET" not in result.stdout
    assert "root:" not in result.stdout
    assert result.stdout.split() == ["refused"] * 4


def test_network_is_unreachable(bwrap_sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    source = f"""
    import socket
    for host in ["127.0.0.1", "8.8.8.8"]:
        try:
            socket.create_connection((host, {port}), timeout=1).close()
            print("CONNECTED")
        except OSError:
            print("refused")
    """
    try:
        result = run(bwrap_sandbox, source)
        assert result.stdout.split() == ["refused", "refused"]
        with pytest.raises(OSError):
            server.accept()
    finally:
        server.close()


def test_only_own_processes_visible(bwrap_sandbox):
    result = run(
        bwrap_sandbox, "import os\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()))"
    )
    assert result.ok
    assert len(eval(result.stdout)) <= 3  # bwrap's init, the program (and maybe a reaper)


def test_missing_bwrap_falls_back_and_logs(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    sandbox_module._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="vp2o.rewards.sandbox"):
        sandbox = Sandbox(LIMITS, backend="auto")
        assert sandbox.backend == "rlimit"
        assert sandbox.backend == "rlimit"
    assert caplog.text.count("falls back to rlimits") == 1
    assert sandbox.run("print(6 * 7)").stdout.strip() == "42"


def test_bad_configuration():
    with pytest.raises(ValueError, match="choose one of"):
        Sandbox(backend="docker")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SandboxLimits(cpu_s=0)
