"""The sandbox uid pool: a new run takes a uid with no unreaped processes, if one is free."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from vp2o.rewards import sandbox_uids
from vp2o.rewards.sandbox_uids import uid_slot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="uid drops need root")

# outside DEFAULT_UIDS, so a sandbox test running beside these never holds them
UID_A, UID_B = 60900, 60901


def _zombie_of(uid: int) -> subprocess.Popen:
    """A process of `uid` that stays a zombie once killed (this test is its parent and waits)."""
    child = subprocess.Popen(["sleep", "30"], user=uid, group=uid, extra_groups=[])
    sandbox_uids.kill_uid(uid)
    deadline = time.monotonic() + 5
    while _state(child.pid) != "Z":
        assert time.monotonic() < deadline, "the killed child never became a zombie"
        time.sleep(0.01)
    return child


def _state(pid: int) -> str:
    stat = open(f"/proc/{pid}/stat").read()
    return stat.rsplit(")", 1)[1].split()[0]


def test_a_uid_with_unreaped_processes_is_passed_over():
    zombie = _zombie_of(UID_A)
    try:
        assert sandbox_uids._processes_of(UID_A) == [zombie.pid]
        for _ in range(5):  # the pool order is shuffled: every draw must skip UID_A
            with uid_slot([UID_A, UID_B]) as uid:
                assert uid == UID_B
    finally:
        zombie.wait()
    assert sandbox_uids._processes_of(UID_A) == []
    with uid_slot([UID_A]) as uid:
        assert uid == UID_A


def test_a_draining_pool_still_hands_out_a_uid(monkeypatch):
    monkeypatch.setattr(sandbox_uids, "_REAP_WAIT_S", 0.2)
    zombie = _zombie_of(UID_A)
    try:
        start = time.monotonic()
        with uid_slot([UID_A]) as uid:  # no clean uid: after a wait, the busy one is used
            assert uid == UID_A
        assert time.monotonic() - start >= 0.2
    finally:
        zombie.wait()


def test_the_runs_processes_are_killed_on_release():
    with uid_slot([UID_B]) as uid:
        # an orphan of the run (its parent gone: init reaps it after the kill, at init's pace)
        subprocess.run(["sh", "-c", "sleep 30 &"], user=uid, group=uid, extra_groups=[],
                       check=True)
        assert sandbox_uids._processes_of(uid) != []
    deadline = time.monotonic() + 10
    while sandbox_uids._processes_of(UID_B):  # killed on release, gone once reaped
        assert time.monotonic() < deadline, "the run's orphan outlived the release"
        time.sleep(0.01)
