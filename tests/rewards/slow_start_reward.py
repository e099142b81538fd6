"""A reward whose module takes longer to import than the pool's per-sample deadline in
tests/rewards/test_reward_pool.py (a heavy import in a user's reward module, a loaded machine)."""

import time

time.sleep(1.5)


def exact(prompt: str, completion: str, sample: dict) -> float:
    return float(completion == "ok")
