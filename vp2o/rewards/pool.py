"""Score completions in worker processes beside the trainer.

A reward function that crashes, hangs or returns a non-finite value costs that one sample (it
scores 0 and is counted in ``failures``), never the run: each submission is waited on with a
deadline, and a pool whose worker hung or died is torn down and rebuilt.

Samples go to the workers in chunks, because one round trip per sample costs more than a cheap
reward itself (exact match on 512 samples: 88 ms one by one, a few ms in chunks, on the 2-core
development VM). A chunk is sized from the per-sample time the workers measured on earlier
batches so that it is expected to take at most ``CHUNK_SHARE`` of the per-sample deadline (the
first batch goes one by one, which measures it). A chunk that misses the deadline, or whose
worker died, is scored again sample by sample in a fresh pool, each with its own deadline: a slow
chunk costs time, never a sample, and a hung sample costs at most two deadlines.
``workers=0`` scores in-process (for debugging; a hang then hangs the trainer).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import multiprocessing as mp
import time
from dataclasses import dataclass

from vp2o.rewards.registry import get_reward

logger = logging.getLogger(__name__)

_FN = None  # the reward function inside a worker process (set by the initializer)


def _raw_reward(name: str):
    """The registered function without its never-raise wrapper, so failures can be counted."""
    fn = get_reward(name)
    return getattr(fn, "__wrapped__", fn)


def _init_worker(name: str) -> None:
    global _FN
    _FN = _raw_reward(name)


def _ready() -> None:
    """A no-op: returns once a worker has started and run its initializer."""


START_TIMEOUT_S = 300.0
"""How long new workers may take to start (spawn, imports, the reward's own module) before the
pool gives up on them. Start-up is not charged to any sample's deadline."""


def _failed(error: BaseException) -> cf.Future:
    """A future that already holds ``error``."""
    future: cf.Future = cf.Future()
    future.set_exception(error)
    return future


class _NotStarted(RuntimeError):
    """The pool's workers did not start (``RewardPool._wait_until_started``)."""

CHUNK_SHARE = 0.05
"""A chunk's expected scoring time, as a share of ``timeout_s`` (the per-sample deadline)."""


def _score_chunk(items: list[tuple]) -> tuple[list[float | str], float]:
    """In a worker: each sample's reward, or the text of the error it raised; and the seconds
    the chunk took to score (its pickling not counted)."""
    start = time.perf_counter()
    out: list[float | str] = []
    for prompt, completion, sample in items:
        try:
            out.append(float(_FN(prompt, completion, sample)))
        except Exception as e:  # noqa: BLE001 - reported to the trainer, costs this sample only
            out.append(f"{type(e).__name__}: {str(e)[:200]}")  # the text may be huge
    return out, time.perf_counter() - start


@dataclass
class Scores:
    """Rewards of one batch.

    Attributes:
        rewards: one float in [0, 1] per sample (0 for failures).
        failures: samples whose reward crashed, timed out or was not finite.
        seconds: wall time of the scoring.
    """

    rewards: list[float]
    failures: int
    seconds: float


class RewardPool:
    """Worker processes running ``get_reward(name)``.

    Args:
        name: reward name or dotted path.
        workers: processes (0 = score in this process).
        timeout_s: deadline per sample, counted from when the batch's earlier samples are done
            (the workers' start-up is waited for separately, see ``_wait_until_started``).
    """

    def __init__(self, name: str, *, workers: int = 2, timeout_s: float = 10.0) -> None:
        get_reward(name)  # fail fast on an unknown name, in the trainer process
        self.name = name
        self.workers = workers
        self.timeout_s = timeout_s
        self._pool: cf.ProcessPoolExecutor | None = None
        self._local = _raw_reward(name) if workers == 0 else None
        self.sample_s: float | None = None
        """Mean scoring time per sample that the workers measured on the last batch that
        completed any (its chunks and its one-by-one retries together)."""
        self._timed_s, self._timed_samples = 0.0, 0  # measured in the batch being scored
        self._start_failure: str | None = None  # why workers did not start, in this batch
        self.last_start_failure: str | None = None
        """Why the workers did not start in the last batch scored (its samples not yet scored
        then scored 0), or None."""
        self.chunk_size = 1
        """Samples per submission in the last batch."""

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._start_failure is not None:  # tried in this batch already: no second wait
            raise _NotStarted(self._start_failure)
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("spawn"),  # no fork of a multi-threaded trainer
                initializer=_init_worker,
                initargs=(self.name,),
            )
            failure = self._wait_until_started()
            if failure is not None:
                self._start_failure = failure
                self._restart()
                raise _NotStarted(failure)
        return self._pool

    def _wait_until_started(self) -> str | None:
        """Start the workers and wait for them outside every sample's deadline.

        A spawned worker imports Python, the reward's module and what it imports (torch, sympy,
        ...) before it takes a task: up to seconds, more on a loaded machine, and the same for
        every fresh pool after a hang. Counted against the first samples' deadlines, a start-up
        slower than ``timeout_s`` would time out every sample of the batch, and then each of them
        again when isolated. One no-op per worker, submitted back to back, spawns them all.
        Returns None, or why they did not start (then the batch's samples not yet scored score
        0 without another wait; the next batch tries a fresh pool).
        """
        start = time.perf_counter()
        try:
            pending = [self._pool.submit(_ready) for _ in range(self.workers)]
        except cf.process.BrokenProcessPool as e:  # a worker died while they were submitted
            pending = [_failed(e)]
        done, not_done = cf.wait(pending, timeout=START_TIMEOUT_S)
        failed = [f for f in done if f.exception() is not None]
        if not_done or failed:
            reason = (f"{type(failed[0].exception()).__name__}: {failed[0].exception()}" if failed
                      else f"not started in {START_TIMEOUT_S:.0f}s")
            logger.warning("reward %r: workers did not start (%s); this batch's remaining "
                           "samples score 0", self.name, reason)
            return reason
        logger.debug("reward %r: %d workers started in %.2fs", self.name, self.workers,
                     time.perf_counter() - start)
        return None

    def score(self, prompts: list[str], completions: list[str], samples: list[dict]) -> Scores:
        """Rewards for each (prompt, completion, sample)."""
        start = time.perf_counter()
        items = list(zip(prompts, completions, samples, strict=True))
        if self._local is not None:
            values = [self._call_local(*item) for item in items]
        else:
            self.chunk_size = self._chunk_size(len(items))
            self._timed_s, self._timed_samples, self._start_failure = 0.0, 0, None
            values = self._score_batch(items)
            if self._timed_samples:
                self.sample_s = self._timed_s / self._timed_samples
        failures = sum(v is None for v in values)
        self.last_start_failure = self._start_failure
        return Scores([v or 0.0 for v in values], failures, time.perf_counter() - start)

    def _call_local(self, prompt: str, completion: str, sample: dict) -> float | None:
        try:
            return _finite(self._local(prompt, completion, sample))
        except Exception as e:  # noqa: BLE001 - a crashing reward costs one sample
            logger.warning("reward %r failed (%s): scored 0", self.name, e)
            return None

    def _chunk_size(self, n: int) -> int:
        """Samples per submission: as many as fit ``CHUNK_SHARE`` of the deadline at the measured
        per-sample time (1 until a batch has measured it), and at most a quarter of each
        worker's share of the batch (so the workers stay evenly loaded)."""
        if self.sample_s is None:
            return 1
        fits = int(CHUNK_SHARE * self.timeout_s / max(self.sample_s, 1e-9))
        return max(1, min(fits, math.ceil(n / (4 * self.workers))))

    def _score_batch(self, items: list[tuple], *, isolate: bool = False) -> list[float | None]:
        """Submit all items in chunks; samples caught in a chunk that missed its deadline, or
        behind a hung or dead worker, are scored again one by one (``isolate``) in fresh pools,
        so the culprit alone scores 0."""
        if isolate:
            return [v for item in items for v in self._score_batch([item])]
        size = self._chunk_size(len(items))
        chunks = [range(i, min(i + size, len(items))) for i in range(0, len(items), size)]
        futures = [self._submit([items[i] for i in c]) for c in chunks]
        values: list[float | None] = [None] * len(items)
        again: list[int] = []
        broken = False
        for chunk, fut in zip(chunks, futures, strict=True):
            if broken and not fut.done():
                again.extend(chunk)
                continue
            try:
                results, took = fut.result(timeout=self.timeout_s)
            except cf.TimeoutError:
                broken = True
                if len(chunk) > 1:
                    again.extend(chunk)  # which of its samples is slow is unknown: isolate
                else:
                    logger.warning("reward %r timed out after %.1fs: scored 0", self.name,
                                   self.timeout_s)
                continue
            except _NotStarted:
                continue  # logged once; its samples score 0
            except cf.process.BrokenProcessPool:
                broken = True
                if len(items) > 1:
                    again.extend(chunk)  # which sample killed the worker is unknown: isolate
                else:
                    logger.warning("reward %r killed its worker: scored 0", self.name)
                continue
            except Exception as e:  # noqa: BLE001 - e.g. a sample that does not pickle
                if len(chunk) > 1:
                    again.extend(chunk)  # one by one: only the culprit scores 0
                else:
                    logger.warning("reward %r failed (%s): scored 0", self.name, e)
                continue
            self._timed_s += took
            self._timed_samples += len(chunk)
            for i, result in zip(chunk, results, strict=True):
                if isinstance(result, str):
                    logger.warning("reward %r failed (%s): scored 0", self.name, result)
                else:
                    values[i] = _finite(result)
        if broken:
            self._restart()
        if again:
            redo = self._score_batch([items[i] for i in again], isolate=True)
            for i, v in zip(again, redo, strict=True):
                values[i] = v
        return values

    def _submit(self, chunk: list[tuple]) -> cf.Future:
        """The chunk's future. A pool that broke before or while the batch is submitted (a
        worker that died) yields a future holding that error, handled like a worker dying
        mid-chunk; workers that did not start, one holding ``_NotStarted`` (the chunk scores 0)."""
        try:
            return self._executor().submit(_score_chunk, chunk)
        except (cf.process.BrokenProcessPool, _NotStarted) as e:
            return _failed(e)

    def _restart(self) -> None:
        if self._pool is not None:
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                proc.kill()  # a hung worker never returns by itself
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Stop the workers."""
        self._restart()


def _finite(value: float) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return min(1.0, max(0.0, value)) if math.isfinite(value) else None
