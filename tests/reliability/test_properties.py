"""Property-based checks (hypothesis) of what reads untrusted text: the config loader (overrides
and YAML files), answer extraction, and every IFEval instruction checker.

tests/rewards/test_rewards_properties.py already checks that the extractors return str or None
and that the checkers of tests/rewards/ifeval_cases.py return bools; here: substrings, every
registered instruction, the loose variants, and the config loader.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vp2o.config import Config, ConfigError, load_config
from vp2o.rewards.extract import (
    answer_phrase,
    last_boxed,
    last_code_block,
    last_number,
    strip_code_blocks,
)
from vp2o.rewards.ifeval import INSTRUCTIONS, build_instruction, evaluate, loose_variants

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _keys(cls=Config, prefix="") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += [prefix + f.name, *_keys(hints[f.name], f"{prefix}{f.name}.")]
        else:
            out.append(prefix + f.name)
    return out


KEYS = _keys()
VALUES = ["0", "1", "-1", "2", "3", "4", "8", "16", "2.5", "1e-5", "nan", ".inf", "-.inf", "true",
          "false", "null", "~", "", "[]", "[1, 0]", "[1,0,1,0]", "{a: 1}", "{}", "'x'", "x", "[",
          "{", ":", "'", "- 1", "!!python/object:os.system", "&a [*a]", "1_000", "0x10", "vp2o",
          "grpo", "gloo", "auto", "jsonl", "adam", "sgd", "rope", "alltoall", "allgather"]
KEY = st.one_of(st.sampled_from(KEYS), st.text(max_size=20),
                st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(KEYS), st.text(max_size=8)))
VALUE = st.one_of(st.sampled_from(VALUES), st.text(max_size=30))
OVERRIDE = st.one_of(st.builds(lambda k, v: f"{k}={v}", KEY, VALUE), st.text(max_size=30))


@SETTINGS
@given(st.lists(OVERRIDE, max_size=6), st.sampled_from([None, 1, 2, 3, 4, 8]))
def test_config_overrides_raise_only_config_error(overrides, world_size):
    try:
        cfg = load_config(None, overrides, world_size=world_size)
    except ConfigError as e:
        assert str(e)
    else:
        assert isinstance(cfg, Config)


@SETTINGS
@given(st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["model:", "  num_experts: 4", "rollout:", "  group_size: [", "- a",
                              ": b", "\t", "train: {steps: 2}", "seed: x", "? k", "&x *x", "---",
                              "...", "  ", "model: 3", "'"]), max_size=12).map("\n".join),
))
def test_config_files_raise_only_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        if "malformed YAML" in str(e) or "top level" in str(e):
            assert str(path) in str(e)


@pytest.mark.parametrize("key", ["model.num_attention_heads", "model.num_query_groups"])
def test_zero_heads_is_a_config_error(key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"{key}=0"])


TEXT = st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(["\\boxed{", "\\fbox{", "}", "{", "\\{", "the answer is ",
                              "Final answer:", "Answer: ", "```", "~~~", "```python\n", "\n",
                              "1,000", "-3.5", "1/2", "42%", "(C)", " ", "x", "é", "\u202e"]),
             max_size=40).map("".join),
)


@SETTINGS
@given(TEXT)
def test_extraction_never_raises_and_returns_a_substring(text):
    for fn in (last_boxed, answer_phrase, last_number, last_code_block):
        out = fn(text)
        assert out is None or (isinstance(out, str) and out in text), (fn.__name__, out)
    stripped = strip_code_blocks(text)
    assert isinstance(stripped, str) and len(stripped) <= len(text)


def test_every_instruction_is_checked_below():
    assert len(INSTRUCTIONS) == 25


KWARGS = {
    "keywords": ["cat", "dog"], "keyword": "cat", "frequency": 2, "relation": "at least",
    "forbidden_words": ["bad"], "letter": "a", "let_frequency": 3, "let_relation": "less than",
    "language": "en", "num_sentences": 2, "num_paragraphs": 2, "num_words": 10,
    "nth_paragraph": 1, "first_word": "hello", "num_placeholders": 1, "postscript_marker": "P.S.",
    "num_bullets": 2, "num_highlights": 1, "section_spliter": "Section", "num_sections": 2,
    "prompt_to_repeat": "say hi", "end_phrase": "bye", "capital_frequency": 2,
    "capital_relation": "at least",
}


def _kwargs(instruction_id: str) -> dict:
    """The KWARGS its constructor accepts."""
    params = inspect.signature(INSTRUCTIONS[instruction_id]).parameters
    return {k: v for k, v in KWARGS.items() if k in params}


@pytest.mark.parametrize("instruction_id", sorted(INSTRUCTIONS))
def test_every_checker_returns_a_bool_on_any_text(instruction_id):
    checker = build_instruction(instruction_id, _kwargs(instruction_id))
    kwargs = [_kwargs(instruction_id)]

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(TEXT)
    def check(text):
        assert isinstance(checker.check(text), bool)
        # evaluate() scores a checker that raises as not followed: call it on the loose
        # variants directly, so that a crash there fails here
        for variant in loose_variants(text):
            assert isinstance(checker.check(variant), bool)
        result = evaluate(text, [instruction_id], kwargs)
        assert tuple(result.strict) in ((True,), (False,))
        assert tuple(result.loose) in ((True,), (False,))

    check()
