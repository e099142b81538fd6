"""Property-based checks: extraction and every reward/checker never raise and stay in range."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ifeval_cases import CASES
from reward_cases import raw_reward

from vp2o.rewards.extract import answer_phrase, last_boxed, last_code_block, last_number
from vp2o.rewards.ifeval import build_instruction

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("\\{}()[]$*-_#`~.,:;!?%/^=+ \n\t0123456789abcABC")),
        st.characters(),
    ),
    max_size=300,
)
SNIPPETS = st.lists(
    st.sampled_from(
        ["\\boxed{", "}", "{", "the answer is ", "Answer: ", "```", "```python\n", "\n",
         "\\frac{1}{2}", "(C)", "42", "50\\%", "***", "******", "P.S.", "<<t>>", "*x*", ","]
    ),
    max_size=30,
).map("".join)  # fmt: skip
ANY_TEXT = st.one_of(TEXT, SNIPPETS)


@SETTINGS
@given(ANY_TEXT)
def test_extractors_never_raise(text):
    for fn in (last_boxed, answer_phrase, last_number, last_code_block):
        out = fn(text)
        assert out is None or isinstance(out, str)


@SETTINGS
@given(st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=50))
def test_boxed_round_trip(content):
    assert last_boxed("noise \\boxed{" + content + "} tail") == content.strip()


@SETTINGS
@given(ANY_TEXT, ANY_TEXT)
def test_text_rewards_in_range(prompt, completion):
    rows = {
        "choice": {"answer": "C"},
        "exact": {"answer": "42"},
        "ifeval_loose": {
            "instruction_id_list": sorted(CASES),
            "kwargs": [CASES[i][0] for i in sorted(CASES)],
        },
    }
    for name, row in rows.items():
        assert 0.0 <= float(raw_reward(name)(prompt, completion, row)) <= 1.0


@settings(max_examples=25, deadline=None)
@given(ANY_TEXT)
def test_math_in_range(completion):
    assert float(raw_reward("math")("", completion, {"answer": "1/2"})) in (0.0, 1.0)


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_checker_returns_bool(instruction_id):
    checker = build_instruction(instruction_id, CASES[instruction_id][0])

    @settings(max_examples=40, deadline=None)
    @given(ANY_TEXT)
    def check(text):
        assert isinstance(checker.check(text), bool)

    check()
