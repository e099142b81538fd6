"""Reward functions for fault tests, used by dotted path (``faulty_rewards:flaky``).

``parity`` is a deterministic, non-trivial reward (so advantages and losses are non-zero).
``flaky`` crashes, returns NaN, or scores by a hash of the completion, and hangs exactly once per
run when ``VP2O_TEST_HANG_MARKER`` names a file that does not exist yet (it writes the hung
completion there first).
"""

from __future__ import annotations

import math
import os
import time
import zlib


def kind(completion: str) -> int:
    """0: crash, 1: NaN, 2: reward 1, 3: reward 0."""
    return zlib.crc32(completion.encode()) % 4


def parity(prompt: str, completion: str, sample: dict) -> float:
    return float(zlib.crc32(completion.encode()) % 2)


def flaky(prompt: str, completion: str, sample: dict) -> float:
    marker = os.environ.get("VP2O_TEST_HANG_MARKER")
    if marker and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(completion)
        time.sleep(3600)
    k = kind(completion)
    if k == 0:
        raise RuntimeError("reward crashed on purpose")
    if k == 1:
        return math.nan
    return float(k == 2)


def _code_fast():
    from vp2o.rewards.code_exec import CodeReward
    from vp2o.rewards.sandbox import SandboxLimits

    limits = SandboxLimits(cpu_s=1, wall_s=2, memory_mb=512, nproc=32, output_bytes=1 << 16)
    return CodeReward(limits, backend="bwrap", total_wall_s=10)


code_fast = _code_fast()
"""The `code` reward with short limits and the bwrap backend (tests/reliability sandbox)."""
