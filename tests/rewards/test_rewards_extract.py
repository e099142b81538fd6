"""Answer extraction helpers: boxed, phrases, numbers, code blocks (correct and fast)."""

from __future__ import annotations

import time

import pytest
from reward_cases import ADVERSARIAL

from vp2o.rewards.extract import (
    answer_phrase,
    last_boxed,
    last_code_block,
    last_number,
    strip_code_blocks,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{5}", "5"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
        ("\\fbox{7}", "7"),
        ("\\boxed 12 apples", "12"),
        ("\\boxed{3} later \\boxed{\\frac{1}{2}", "3"),  # unbalanced last box skipped
        ("no box here", None),
        ("\\boxed{", None),
        ("\\boxedfoo{3}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is 42.", "42"),
        ("Final answer: $\\frac{3}{4}$", "\\frac{3}{4}"),
        ("The answer is 0.5. Then more text.", "0.5"),
        ("Answer: **B**", "B"),
        ("the answer is \\boxed{9} indeed", "9"),
        ("I answered it. No final phrase", None),
        ("The answer is 1. Wait, the answer is 2.", "2"),
    ],
)
def test_answer_phrase(text, expected):
    assert answer_phrase(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("we get 3 then 4", "4"),
        ("total 1,000,000 dollars", "1,000,000"),
        ("ratio 3/4", "3/4"),
        ("-2.5 degrees", "-2.5"),
        ("about 50% of it", "50%"),
        ("none", None),
        ("9" * 100, None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_code_blocks():
    text = "a\n```python\nx = 1\n```\nb\n```\ny = 2\n```\nc"
    assert last_code_block(text) == "y = 2\n"
    assert strip_code_blocks(text).split() == ["a", "b", "c"]
    assert last_code_block("text\n```python\nprint(1)\n") == "print(1)\n"  # unclosed
    assert last_code_block("no fences") is None
    assert last_code_block("```py\n```") == ""


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_fast(name):
    text = ADVERSARIAL[name]
    start = time.monotonic()
    for fn in (last_boxed, answer_phrase, last_number, last_code_block, strip_code_blocks):
        fn(text)
    assert time.monotonic() - start < 2.0
