"""Hostile programs through the `code` reward, scored by the trainer's RewardPool in a worker
process: each scores 0 and leaves the trainer (this process), the pool, the run directory and
the machine as they were.

Each program prints the expected output ("PWNED") only if its attack worked. The sandbox's own
limit tests (both backends) are in tests/rewards/test_rewards_sandbox.py; this runs the attacks
the way training does, under bubblewrap.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

import pytest
from procs import live_pids

from vp2o.rewards.pool import RewardPool
from vp2o.rewards.sandbox import Sandbox

pytestmark = pytest.mark.slow
MARKER = "27.18281828"


def _attacks(run_dir: Path, home: Path, port: int) -> dict[str, str]:
    secret, ssh = run_dir / "secret.txt", home / ".ssh"
    trainer = os.getpid()
    return {
        "read-run-dir": f"print('PWNED' if 'SECRET' in open({str(secret)!r}).read() else '')",
        "write-run-dir": f"open({str(run_dir / 'pwned')!r}, 'w').write('x'); print('PWNED')",
        "list-run-dir": f"import os; os.listdir({str(run_dir)!r}); print('PWNED')",
        "read-ssh": f"print('PWNED' if 'PRIVATE' in open({str(ssh / 'id_ed25519')!r}).read() "
                    "else '')",
        "write-ssh": f"open({str(ssh / 'authorized_keys')!r}, 'a').write('evil'); print('PWNED')",
        "write-real-home": "import os\nopen(os.path.join('/root', '.ssh', 'vp2o_pwned'), 'w')\n"
                           "print('PWNED')",
        "network-host": f"import socket; socket.create_connection(('127.0.0.1', {port}), "
                        "timeout=1); print('PWNED')",
        "network-outside": "import socket; socket.create_connection(('1.1.1.1', 80), timeout=1);"
                           " print('PWNED')",
        "fork-bomb": "import os\nfor _ in range(10_000):\n    try:\n        os.fork()\n"
                     "    except OSError:\n        pass\nwhile True:\n    pass",
        "allocate-10GiB": "x = bytearray(10 * 1024**3)\nprint('PWNED')",
        "infinite-loop": "while True:\n    pass",
        "print-1GB": "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n"
                     "    sys.stdout.write(chunk)\nprint('PWNED')",
        "kill-parent": textwrap.dedent(f"""\
            import os, signal
            try:
                os.kill(os.getppid(), signal.SIGKILL)
            except OSError:
                pass
            os.kill({trainer}, signal.SIGKILL)
            print('PWNED')
            """),
        "leave-a-child": textwrap.dedent(f"""\
            import subprocess
            subprocess.Popen(['sleep', '{MARKER}'], start_new_session=True)
            subprocess.Popen(['sleep', '{MARKER}'])
            """),
    }


@pytest.fixture(scope="module")
def bwrap_available():
    if Sandbox(backend="auto").backend != "bwrap":
        pytest.skip("bubblewrap is not usable here (the rlimit fallback does not isolate)")


def test_attacks_score_0_and_leave_the_trainer_unharmed(tmp_path, bwrap_available, private_tmp):
    run_dir, home = tmp_path / "run", tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA good\n")
    run_dir.mkdir()
    (run_dir / "secret.txt").write_text("SECRET")
    for path in (tmp_path, run_dir, home, home / ".ssh"):
        path.chmod(0o777)  # even world-writable, nothing outside the sandbox is reachable
    for path in (run_dir / "secret.txt", home / ".ssh" / "id_ed25519",
                 home / ".ssh" / "authorized_keys"):
        path.chmod(0o666)
    before = {p: p.read_bytes() for p in [*run_dir.iterdir(), *(home / ".ssh").iterdir()]}
    real_ssh = Path("/root/.ssh")
    real_ssh_before = sorted(os.listdir(real_ssh)) if real_ssh.is_dir() else None
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.1)
    attacks = _attacks(run_dir, home, server.getsockname()[1])
    names = list(attacks)
    completions = [f"```python\n{attacks[n]}\n```" for n in names]
    row = {"tests": [{"input": "", "output": "PWNED"}]}
    pool = RewardPool("faulty_rewards:code_fast", workers=1, timeout_s=60)
    try:
        start = time.monotonic()
        scores = pool.score([""] * len(names), completions, [row] * len(names))
        elapsed = time.monotonic() - start
        control = pool.score([""], ["```python\nprint('PWNED')\n```"], [row])
    finally:
        pool.close()
    with pytest.raises(OSError):
        server.accept()  # nobody connected
    server.close()
    assert dict(zip(names, scores.rewards, strict=True)) == dict.fromkeys(names, 0.0)
    assert scores.failures == 0  # contained attacks are ordinary zero scores, not failures
    assert control.rewards == [1.0] and control.failures == 0  # the pool still works
    assert elapsed < 60, elapsed  # each run is bounded by its wall clock
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["secret.txt"]
    if real_ssh_before is not None:
        assert sorted(os.listdir(real_ssh)) == real_ssh_before
    else:
        assert not real_ssh.exists()
    time.sleep(0.3)
    assert live_pids(MARKER) == [] and live_pids(private_tmp) == []
