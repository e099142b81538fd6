"""The `choice` reward: usual phrasings, wrong letters, option-range limits, adversarial input."""

from __future__ import annotations

import pytest
from reward_cases import ADVERSARIAL, raw_reward

from vp2o.rewards import get_reward
from vp2o.rewards.choice import extract_choice, gold_letter, option_letters

PROMPT = "Which gas do plants absorb?\nA. Oxygen\nB. Nitrogen\nC. Carbon dioxide\nD. Helium\n"
ROW = {"answer": "C"}


@pytest.mark.parametrize(
    "completion",
    [
        "Answer: C",
        "answer: c",
        "The answer is (C).",
        "The correct option is C because plants photosynthesise.",
        "The correct answer is: C",
        "Option C is correct.",
        "After thinking, **C**",
        "$\\boxed{C}$",
        "\\boxed{\\text{(C)}}",
        "(C)",
        "C",
        "C.",
        "I first thought the answer is A. On reflection, the answer is C.",
        "Final Answer: [C]",
        "The answer is C, and I am sure of it.",  # "I" + a word is the pronoun, not a hedge
    ],
)
def test_good(completion):
    assert get_reward("choice")(PROMPT, completion, ROW) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "Answer: B",
        "The answer is C. Wait, no: the answer is D.",
        "The answer is Alice.",
        "A B C D",
        "I cannot decide.",
        "Answer: E",  # not an option of this prompt
        "```\nAnswer: C\n```\nAnswer: A",  # answer hidden in a code block
        "",
        # hedges choose nothing, whichever letter is gold
        "Answer: C or D",
        "Answer: A, B, C, D",
        "The answer is (C) or (B)",
        "Answer: C/D",
        "Answer: **C** or **D**",
    ],
)
def test_wrong(completion):
    assert get_reward("choice")(PROMPT, completion, ROW) == 0.0


def test_prompt_containing_the_answer_does_not_help():
    prompt = PROMPT + "Hint: the answer is C.\n"
    assert get_reward("choice")(prompt, "I am not sure.", ROW) == 0.0


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial(name):
    assert float(raw_reward("choice")(PROMPT, ADVERSARIAL[name], ROW)) in (0.0, 1.0)


def test_gold_forms():
    assert gold_letter({"answer": "(b)"}) == "B"
    assert gold_letter({"answer": 2}) == "C"
    assert gold_letter({"answer": "Carbon"}) is None
    assert gold_letter({"answer": True}) is None
    assert get_reward("choice")(PROMPT, "Answer: C", {"answer": 2}) == 1.0
    assert get_reward("choice")(PROMPT, "Answer: C", {}) == 0.0


def test_option_letters():
    assert option_letters(PROMPT, {}) == "ABCD"
    assert option_letters("no labels", {"options": ["x", "y", "z"]}) == "ABC"
    assert option_letters("no labels", {}) == "ABCDEFGHIJ"
    assert extract_choice("Answer: I", "ABCDEFGHIJ") == "I"
    assert extract_choice("Answer: I", "ABCD") is None


def test_the_pronoun_i_is_not_option_i():
    ten = "ABCDEFGHIJ"
    assert extract_choice("The answer is I think B", ten) is None
    assert extract_choice("Answer: I'm not sure", ten) is None
    assert extract_choice("The answer is (I).", ten) == "I"
    assert extract_choice("Answer: I", ten) == "I"


def test_long_whitespace_runs_are_linear():
    """Adjacent \\s* in the strong patterns backtracked cubically over a whitespace run (7.6 s for
    1,600 spaces), and the newline collapse rescanned a space run quadratically (1.1 s for 20,000
    spaces, 110 s for 200,000); runs are collapsed spaces first. Counted in regex steps would be
    exact; instead the runs are long enough that anything worse than linear takes minutes, while
    linear takes milliseconds: a 5 s bound holds on a loaded machine."""
    import time

    for filler in (" " * 200_000, "\n" * 200_000, " \n\t" * 70_000, "\t" * 200_000):
        t0 = time.perf_counter()
        assert extract_choice("The answer is" + filler + "?", "ABCD") is None
        assert time.perf_counter() - t0 < 5.0
    assert extract_choice("Answer:" + " " * 50 + "C", "ABCD") == "C"
