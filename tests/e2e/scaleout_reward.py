"""A reward with signal on an untrained model (the response length, capped), so the first
step's group advantages are not all zero: ``reward.name=scaleout_reward:length_reward``."""


def length_reward(prompt: str, completion: str, sample: dict) -> float:
    """min(len(completion), 4) / 4."""
    return min(len(completion), 4) / 4
