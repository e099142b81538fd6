"""The `math` reward: equivalent forms, near misses, percentages, adversarial input, timeouts."""

from __future__ import annotations

import threading
import time

import pytest
from reward_cases import ADVERSARIAL, raw_reward

from vp2o.rewards import get_reward
from vp2o.rewards.math_answer import MathReward, clean_answer, extract_math_answer
from vp2o.rewards.math_verifier import MathVerifier


@pytest.fixture(scope="module")
def math_reward():
    # A generous per-check bound: these tests are about the verdicts, and the suite's other
    # worker can starve a check for seconds (test_pathological... tests the timeout itself).
    reward = MathReward(timeout_s=30.0, max_workers=2)
    yield reward
    reward.verifier.close()


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("So $x = \\boxed{\\frac{1}{2}}$.", "1/2"),
        ("The answer is 0.5.", "\\frac{1}{2}"),
        ("Therefore the answer is $\\frac12$", "0.5"),
        ("\\boxed{1/2}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{3}{4}}", "0.75"),
        ("We find 12 apples, and 30 in total", "30"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
        ("\\boxed{(0, 1]}", "(0,1]"),
        ("\\boxed{(x+1)^2}", "x^2+2x+1"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2"),
        ("Final answer: 5 dollars.", "5"),
        ("\\boxed{5\\text{ cm}}", "5"),
        ("\\boxed{90^\\circ}", "90"),
        ("\\boxed{3}", 3),
        ("\\boxed{7}", ["6", "7"]),
        ("\\boxed{2}", "\\boxed{2}"),
        ("The answer is 1,234,567.5", "1234567.5"),
        ("so x = \u22125", "-5"),  # U+2212 MINUS SIGN, unboxed
        ("\\boxed{y = 2x+1}", "2x+1"),
        # joined equations are compared as lists of equations, in any order
        ("\\boxed{x=2 \\lor x=1}", "x=1 \\lor x=2"),
        ("\\boxed{x = 2 \\text{ or } x = 1}", "x=1 \\lor x=2"),
        ("\\boxed{x=1, x=2}", "x=1 \\lor x=2"),
        ("\\boxed{\\{1, 2\\}}", "x=1 \\lor x=2"),
        ("\\boxed{y=2 \\text{ and } x=1}", "x=1 \\land y=2"),
        ("\\boxed{x=3 \\quad x=-3}", "x=-3, x=3"),
    ],
)
def test_equivalent_forms_score_one(math_reward, completion, gold):
    assert math_reward("", completion, {"answer": gold}) == 1.0


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("\\boxed{0.51}", "0.5"),
        ("\\boxed{0.33}", "1/3"),
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
        ("The answer is 2.", "-2"),
        ("\\boxed{x^2+1}", "(x+1)^2"),
        ("\\boxed{\\{1, 2, 3\\}}", "\\{1,2\\}"),
        ("\\boxed{[0, 1]}", "(0,1]"),
        ("\\boxed{31}", "30"),
        # a comma that does not group thousands is not dropped: a pair is not a number
        ("\\boxed{1,2}", "12"),
        ("\\boxed{23}", "2,3"),
        ("\\boxed{1,5}", "15"),
        ("so x = \u22125", "5"),
        # an equation is one value only as `symbol = value`: math-verify alone reduced these to
        # their last right-hand side
        ("\\boxed{5 = 7}", "7"),
        ("\\boxed{1=2=3}", "3"),
        ("\\boxed{x=1 \\lor x=2}", "2"),
        ("\\boxed{x=1 \\quad x=2}", "2"),
        # a hedge over equations does not pass an equation gold, nor one root a gold of two
        ("\\boxed{x=1 \\lor x=2}", "x=2"),
        ("\\boxed{x=1 \\text{ or } x=2}", "x=2"),
        ("\\boxed{x=2}", "x=1 \\lor x=2"),
        ("\\boxed{2}", "x=1 \\lor x=2"),
        ("\\boxed{x=1 \\lor x=3}", "x=1 \\lor x=2"),
        ("\\boxed{y=2}", "x=1 \\land y=2"),
        ("\\boxed{x=2 \\land y=1}", "x=1 \\land y=2"),
    ],
)
def test_near_misses_score_zero(math_reward, completion, gold):
    assert math_reward("", completion, {"answer": gold}) == 0.0


def test_percentages_only_when_allowed(math_reward):
    assert math_reward("", "It is \\boxed{50\\%}", {"answer": "0.5", "allow_percent": True}) == 1.0
    assert math_reward("", "about 50%", {"answer": "0.5", "allow_percent": True}) == 1.0
    assert math_reward("", "It is \\boxed{50\\%}", {"answer": "0.5"}) == 0.0
    assert math_reward("", "It is \\boxed{50\\%}", {"answer": "50"}) == 1.0  # % just dropped


def test_last_box_wins_and_prompt_is_ignored(math_reward):
    prompt = "What is 2+2? (The answer is \\boxed{4}.)"
    assert math_reward(prompt, "I think \\boxed{4}... no, \\boxed{5}", {"answer": "4"}) == 0.0
    assert math_reward(prompt, "No idea.", {"answer": "4"}) == 0.0
    assert math_reward(prompt, "", {"answer": "4"}) == 0.0


def test_answer_hidden_in_code_block_does_not_count(math_reward):
    completion = "Let me compute.\n```python\nprint(42)  # 42\n```\n"
    assert math_reward("", completion, {"answer": "42"}) == 0.0


def test_missing_gold_scores_zero(math_reward):
    assert math_reward("", "\\boxed{1}", {}) == 0.0
    assert math_reward("", "\\boxed{1}", {"answer": None}) == 0.0


@pytest.mark.parametrize(
    ("raw", "allow_percent", "expected"),
    [
        ("$\\frac{1}{2}$", False, "\\frac{1}{2}"),
        ("\\(3\\)", False, "3"),
        ("50\\%", False, "50"),
        ("50\\%", True, "50\\%"),
        ("12 apples", False, "12"),
        ("45^{\\circ}", False, "45"),
        ("x + y", False, "x + y"),
    ],
)
def test_clean_answer(raw, allow_percent, expected):
    assert clean_answer(raw, allow_percent=allow_percent) == expected


def test_extract_priority():
    assert extract_math_answer("the answer is 3, i.e. \\boxed{4}") == "4"
    assert extract_math_answer("x is 3. The answer is 5. Check: 7 works") == "5"
    assert extract_math_answer("values 1, 2 and 3") == "3"
    assert extract_math_answer("nothing") is None


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completions(name):
    reward = raw_reward("math")
    start = time.monotonic()
    assert float(reward("", ADVERSARIAL[name], {"answer": "42"})) in (0.0, 1.0)
    assert time.monotonic() - start < 12.0


def test_pathological_check_is_killed_within_timeout():
    verifier = MathVerifier(timeout_s=0.5, max_workers=1)
    try:
        reward = MathReward(verifier=verifier)
        start = time.monotonic()
        assert reward("", "\\boxed{10^{10^{10}}}", {"answer": "1"}) == 0.0
        # first call also pays the worker start-up (about a second)
        assert time.monotonic() - start < 8.0
        assert verifier.timeouts == 1
        # A fresh worker replaces the killed one; its first check gets room for a loaded machine.
        verifier.timeout_s = 30.0
        assert reward("", "\\boxed{\\frac{2}{4}}", {"answer": "0.5"}) == 1.0  # fresh worker
        assert verifier.timeouts == 1
    finally:
        verifier.close()


def test_works_off_the_main_thread(math_reward):
    results = []

    def work(i):
        results.append(math_reward("", f"\\boxed{{\\frac{{{i}}}{{2}}}}", {"answer": str(i / 2)}))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [1.0] * 6


def test_registered_reward_is_safe():
    reward = get_reward("math")
    assert reward(None, None, None) == 0.0
    assert reward("", "\\boxed{2}", {"answer": object()}) == 0.0


def test_model_text_is_never_evaluated(math_reward, tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"The answer is __import__('pathlib').Path('{marker}').touch()",
        f"The answer is exec(\"open('{marker}', 'w')\")",
    ]
    for completion in payloads:
        assert math_reward("", completion, {"answer": "0"}) == 0.0
    assert not marker.exists()
