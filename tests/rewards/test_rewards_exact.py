"""The `exact` reward: normalised exact match."""

from __future__ import annotations

import pytest
from reward_cases import ADVERSARIAL, raw_reward

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
        ("The answer is \u22125", "-5"),  # U+2212 MINUS SIGN
        ("-5.", "-5"),
        ("+4", "4"),
        ("3.5", "3.5"),
        ("well-known", "well known"),
        ("C++", "C++"),
        ("The answer is A.", "A"),  # a gold that is only an article
        ("(a)", "A"),
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
        ("5", "-5"),  # the sign is part of the answer
        ("-5", "5"),
        ("3 5", "3.5"),
        ("35", "3.5"),
        ("C", "C++"),
        ("C", "C#"),
        ("an", "A"),
        ("Paris", "A"),
    ],
)
def test_wrong(completion, gold):
    assert get_reward("exact")("", completion, {"answer": gold}) == 0.0


def test_prompt_is_ignored():
    assert get_reward("exact")("Answer: Paris", "no idea", {"answer": "Paris"}) == 0.0


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial(name):
    assert float(raw_reward("exact")("", ADVERSARIAL[name], {"answer": "42"})) in (0.0, 1.0)


def test_normalize():
    assert normalize("  The  Quick, brown fox! ") == "quick brown fox"
    assert normalize("x = \u22125, y = 1,000.5; .5") == "x -5 y 1,000.5 .5"
    assert normalize("Vitamin A", articles=True) == "vitamin a"
    assert normalize("") == ""


@pytest.mark.parametrize(("gold", "score"), [("Paris", 1.0), ("London", 0.0), ("Berlin", 0.0)])
def test_one_answer_per_completion(gold, score):
    """A box, an "Answer:" and a last line naming three answers are not three guesses: the box
    is the answer."""
    completion = "\\boxed{Paris}\nAnswer: London\nBerlin"
    assert get_reward("exact")("", completion, {"answer": gold}) == score
    assert get_reward("exact")("", "Answer: London\nBerlin", {"answer": "Berlin"}) == 0.0
