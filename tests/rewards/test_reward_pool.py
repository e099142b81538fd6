"""RewardPool: a crashing, hanging or NaN reward costs one sample, not the run."""

from __future__ import annotations

import time

from vp2o.rewards.pool import RewardPool


def flaky(prompt: str, completion: str, sample: dict) -> float:
    """Test reward: behaviour chosen by the completion text."""
    if completion == "crash":
        raise RuntimeError("boom")
    if completion == "hang":
        time.sleep(60)
    if completion == "nan":
        return float("nan")
    if completion == "die":
        import os

        os._exit(3)
    return 1.0 if completion == sample["answer"] else 0.0


def _score(pool, completions):
    n = len(completions)
    return pool.score(["p"] * n, completions, [{"answer": "ok"}] * n)


def test_pool_scores_and_counts_failures():
    pool = RewardPool(f"{__name__}:flaky", workers=2, timeout_s=2.0)
    try:
        out = _score(pool, ["ok", "no", "crash", "nan", "ok"])
        assert out.rewards == [1.0, 0.0, 0.0, 0.0, 1.0]
        assert out.failures == 2
        start = time.perf_counter()
        out = _score(pool, ["ok", "hang", "ok", "ok", "die", "ok"])
        assert time.perf_counter() - start < 20
        assert out.rewards == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
        assert out.failures == 2
        # The pool recovered: a later batch is scored normally.
        assert _score(pool, ["ok", "no"]).rewards == [1.0, 0.0]
    finally:
        pool.close()


def test_in_process_scoring():
    pool = RewardPool("exact", workers=0)
    out = pool.score(["1+1="], ["2"], [{"answer": "2"}])
    assert out.rewards == [1.0] and out.failures == 0


def test_chunks_score_like_single_samples_and_isolate_failures():
    """After a batch has measured the reward's time, samples go in chunks; a crash, NaN, hang or
    dead worker inside a chunk still costs only its own sample (the chunk is scored again one
    by one), and the scores equal the one-by-one ones."""
    pool = RewardPool(f"{__name__}:flaky", workers=2, timeout_s=1.0)
    try:
        first = _score(pool, ["ok", "no"] * 20)
        assert pool.chunk_size == 1 and pool.sample_s is not None
        assert first.rewards == [1.0, 0.0] * 20
        bad = {5: "crash", 17: "nan", 23: "hang", 31: "die"}
        completions = [bad.get(i, "ok" if i % 3 else "no") for i in range(40)]
        start = time.perf_counter()
        out = _score(pool, completions)
        assert pool.chunk_size > 1
        assert time.perf_counter() - start < 30
        expected = [0.0 if c != "ok" else 1.0 for c in completions]
        assert out.rewards == expected
        assert out.failures == 4
        again = _score(pool, ["ok", "no"] * 20)
        assert pool.chunk_size > 1 and again.rewards == first.rewards
    finally:
        pool.close()


def test_a_sample_that_does_not_pickle_costs_only_itself():
    """A dataset row the pool cannot send to a worker (here a lambda in it) fails its whole
    chunk; the chunk is scored again one by one and only that row scores 0."""
    pool = RewardPool(f"{__name__}:flaky", workers=1, timeout_s=1.0)
    try:
        _score(pool, ["ok"] * 8)  # measures the reward's time: chunks from now on
        rows = [{"answer": "ok"} for _ in range(16)]
        rows[5] = {"answer": "ok", "bad": lambda: None}
        out = pool.score(["p"] * 16, ["ok"] * 16, rows)
        assert pool.chunk_size > 1
        assert out.rewards == [0.0 if i == 5 else 1.0 for i in range(16)]
        assert out.failures == 1
    finally:
        pool.close()


def test_worker_start_up_is_not_charged_to_the_samples_deadlines():
    """Workers that take longer to start than ``timeout_s`` (here a 1.5 s import against a 1 s
    deadline) score every sample: start-up is waited for outside the per-sample deadlines."""
    pool = RewardPool("slow_start_reward:exact", workers=2, timeout_s=1.0)
    try:
        out = _score(pool, ["ok", "no", "ok", "no"])
        assert out.rewards == [1.0, 0.0, 1.0, 0.0] and out.failures == 0
    finally:
        pool.close()


def test_workers_that_never_start_cost_one_start_up_wait_per_batch(monkeypatch):
    """A reward module that hangs on import in the workers: each batch waits for the workers'
    start-up once (START_TIMEOUT_S), then scores 0, not once per sample of a one-by-one
    retry."""
    from vp2o.rewards import pool as pool_module

    monkeypatch.setattr(pool_module, "START_TIMEOUT_S", 2.0)
    # the trainer-side name check would import (and hang on) the module in this process
    monkeypatch.setattr(pool_module, "get_reward", lambda name: lambda p, c, s: 1.0)
    pool = RewardPool("hanging_start_reward:exact", workers=2, timeout_s=0.5)
    try:
        for _ in range(2):
            start = time.perf_counter()
            out = _score(pool, ["ok", "no", "ok", "no", "ok", "no"])
            assert out.rewards == [0.0] * 6 and out.failures == 6
            assert time.perf_counter() - start < 2.0 + 6.0
    finally:
        pool.close()


def test_a_reward_whose_workers_cannot_start_scores_0_without_raising():
    pool = RewardPool(f"{__name__}:flaky", workers=2, timeout_s=1.0)
    pool.name = f"{__name__}:no_such_function"  # the workers' initializer raises
    try:
        out = _score(pool, ["ok", "ok", "no"])
        assert out.rewards == [0.0, 0.0, 0.0] and out.failures == 3
    finally:
        pool.close()
