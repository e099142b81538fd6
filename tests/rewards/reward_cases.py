"""Adversarial completions shared by the reward tests (each reward must score them in [0, 1])."""

from __future__ import annotations

import random

_rng = random.Random(0)

ADVERSARIAL = {
    "empty": "",
    "whitespace": " \n\t \n",
    "one_mb": "7 " * (1 << 19),
    "one_mb_braces": "\\boxed{" * 150_000,
    "binary": bytes(_rng.randrange(256) for _ in range(4096)).decode("latin-1"),
    "nul_bytes": "\x00\x01\x02 \\boxed{\x00} answer: \x00",
    "unicode": "答案是 ½ ✓ \u202e\u200b 𝟙𝟚 \ud800 \\boxed{４２}",
    "unbalanced_open": "so \\boxed{\\frac{1}{2} and then nothing",
    "unbalanced_close": "}}}} \\boxed}{ ]]] ))) the answer is }",
    "nested": "\\boxed{\\boxed{\\boxed{\\frac{\\sqrt{\\{1\\}}}{2}}}}",
    "code_only": "```python\nprint(42)\n```",
    "fence_storm": "```\n" * 10_000,
    "huge_number": "the answer is " + "9" * 100_000,
    "deep_latex": "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    "power_tower": "\\boxed{10^{10^{10^{10}}}}",
}
"""Name -> completion; every reward must score these without raising (and, here, fast)."""


def raw_reward(name: str):
    """The registered reward ``name`` without ``safe_reward``'s wrapper, which turns any
    exception into 0.0: "scores without raising" must be checked on the reward itself."""
    from vp2o.rewards import get_reward

    return get_reward(name).__wrapped__
