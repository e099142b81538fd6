"""A reward module that imports in the trainer's process but raises when a reward worker (a
spawned child) imports it: the pool's workers never start (test_trainer_faults.py)."""

from __future__ import annotations

import multiprocessing

if multiprocessing.parent_process() is not None:
    raise ImportError("this reward module refuses to import in a worker process (on purpose)")


def score(prompt: str, completion: str, sample: dict) -> float:
    return 1.0
