"""A reward whose module never finishes importing (tests/rewards/test_reward_pool.py)."""

import time

time.sleep(3600)


def exact(prompt: str, completion: str, sample: dict) -> float:
    return float(completion == "ok")
