"""The `exact` reward: normalised exact match."""

from __future__ import annotations

import pytest
from reward_cases import ADVERSARIAL

from vp2o.rewards import get_reward
from vp2o.rewards.exact import normalize


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("Paris", "Paris"),
        ("  paris. ", "Paris"),
        ("The Eiffel Tower", "eiffel tower"),
        ("Let me think.\nThe capital is...\nParis", "Paris"),
        ("The answer is Paris.", "Paris"),
        ("\\boxed{Paris}", "Paris"),
        ("ＰＡＲＩＳ", "paris"),  # full-width letters (NFKC)
        ("New  York", ["NYC", "new york"]),
    ],
)
def test_good(completion, gold):
    assert get_reward("exact")("", completion, {"answer": gold}) == 1.0


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("London", "Paris"),
        ("Paris or London", "Paris"),
        ("Parisian", "Paris"),
        ("```\nParis\n```", "Paris"),
        ("", "Paris"),
        ("Paris", ""),
        ("Paris", None),
    ],
)
def test_wrong(completion, gold):
    assert get_reward("exact")("", completion, {"answer": gold}) == 0.0


def test_prompt_is_ignored():
    assert get_reward("exact")("Answer: Paris", "no idea", {"answer": "Paris"}) == 0.0


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial(name):
    assert get_reward("exact")("", ADVERSARIAL[name], {"answer": "42"}) in (0.0, 1.0)


def test_normalize():
    assert normalize("  The  Quick, brown fox! ") == "quick brown fox"
    assert normalize("") == ""
