"""Verifiable rewards: `(prompt, completion, sample) -> float` in [0, 1], looked up by name.

Built in: `math` (final answer through math-verify, bounded), `choice` (multiple-choice letter),
`ifeval` / `ifeval_loose` (fraction of IFEval instructions followed), `code` (pass fraction of a
sandboxed program on stdin/stdout tests), `exact` (normalised exact match). Register your own with
`@register_reward("name")`, or name a callable by dotted path ("pkg.module:fn") in the config.
Every callable from `get_reward` never raises: a failure scores 0.0. See docs/rewards.md.
"""

from vp2o.rewards import (  # noqa: F401 - importing registers the built-in rewards
    choice,
    code_exec,
    exact,
    ifeval,
    math_answer,
)
from vp2o.rewards.registry import REWARDS, RewardFn, available, get_reward, register_reward

__all__ = ["REWARDS", "RewardFn", "available", "get_reward", "register_reward"]
