"""IFEval strict/loose scoring and the `ifeval` / `ifeval_loose` rewards."""

from __future__ import annotations

import pytest
from reward_cases import ADVERSARIAL, raw_reward

from vp2o.rewards import get_reward
from vp2o.rewards.ifeval import evaluate, loose_variants

# The public IFEval rows pad every kwargs dict with the same keys, mostly None.
_KEYS = [
    "num_highlights", "relation", "num_words", "num_placeholders", "prompt_to_repeat",
    "num_bullets", "section_spliter", "num_sections", "capital_relation", "capital_frequency",
    "keywords", "num_paragraphs", "language", "let_relation", "letter", "let_frequency",
    "end_phrase", "forbidden_words", "keyword", "frequency", "num_sentences",
    "postscript_marker", "first_word", "nth_paragraph",
]  # fmt: skip


def padded(**kwargs):
    row = dict.fromkeys(_KEYS)
    row.update(kwargs)
    return row


ROW = {
    "prompt": "Write about Raymond III without commas, highlight 2 sections, 20+ words.",
    "instruction_id_list": [
        "punctuation:no_comma",
        "detectable_format:number_highlighted_sections",
        "length_constraints:number_words",
    ],
    "kwargs": [padded(), padded(num_highlights=2), padded(num_words=20, relation="at least")],
}


def test_all_followed():
    response = "*Raymond III* was Count of Tripoli. *His reign* saw many wars and he ruled " * 2
    assert get_reward("ifeval")(ROW["prompt"], response, ROW) == 1.0
    result = evaluate(response, ROW["instruction_id_list"], ROW["kwargs"])
    assert result.prompt_strict and result.prompt_loose
    assert result.strict == (True, True, True)


def test_fraction_followed():
    response = "Raymond III, Count of Tripoli, ruled for a long time in the twelfth century " * 2
    # comma used, no highlights, but enough words: 1 of 3
    assert get_reward("ifeval")("", response, ROW) == pytest.approx(1 / 3)
    result = evaluate(response, ROW["instruction_id_list"], ROW["kwargs"])
    assert result.strict == (False, False, True)
    assert not result.prompt_strict


def test_loose_removes_first_and_last_lines_and_emphasis():
    row = {
        "instruction_id_list": ["startend:quotation", "punctuation:no_comma"],
        "kwargs": [{}, {}],
    }
    response = 'Sure, here it is:\n"A quoted answer without commas"'
    assert get_reward("ifeval")("", response, row) == 0.0
    assert get_reward("ifeval_loose")("", response, row) == 1.0
    row = {"instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Peace."}]}
    assert get_reward("ifeval")("", "Goodbye. **Peace.**", row) == 0.0
    assert get_reward("ifeval_loose")("", "Goodbye. **Peace.**", row) == 1.0


def test_loose_variants():
    variants = loose_variants("first\n*middle*\nlast")
    assert len(variants) == 8
    assert "*middle*" in variants and "middle" in variants
    assert "*middle*\nlast" in variants and "first\n*middle*" in variants


def test_empty_response_follows_nothing():
    row = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert get_reward("ifeval")("", "", row) == 0.0
    assert get_reward("ifeval_loose")("", "   \n ", row) == 0.0


def test_unknown_or_malformed_instruction_counts_as_not_followed(caplog):
    row = {
        "instruction_id_list": ["punctuation:no_comma", "no:such_thing", "keywords:frequency"],
        "kwargs": [{}, {}, {"keyword": "x", "frequency": 1, "relation": "sometimes"}],
    }
    assert get_reward("ifeval")("", "fine text", row) == pytest.approx(1 / 3)
    assert "no:such_thing" in caplog.text


@pytest.mark.parametrize(
    "row",
    [
        {},
        {"instruction_id_list": []},
        {"instruction_id_list": "punctuation:no_comma"},
        {"instruction_id_list": ["punctuation:no_comma"], "kwargs": "bad"},
        {"instruction_id_list": ["punctuation:no_comma"], "kwargs": ["bad"]},
        {"instruction_id_list": [None, 3], "kwargs": [None]},
    ],
)
def test_malformed_rows_never_raise(row):
    for name in ("ifeval", "ifeval_loose"):
        assert 0.0 <= float(raw_reward(name)("", "text", row)) <= 1.0


def test_missing_kwargs_treated_as_empty():
    row = {"instruction_id_list": ["punctuation:no_comma"]}
    assert get_reward("ifeval")("", "no comma", row) == 1.0


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial(name):
    row = {
        "instruction_id_list": [
            "language:response_language",
            "detectable_format:json_format",
            "length_constraints:number_sentences",
            "detectable_format:number_highlighted_sections",
        ],
        "kwargs": [
            {"language": "en"},
            {},
            {"num_sentences": 3, "relation": "at least"},
            {"num_highlights": 1},
        ],
    }
    assert 0.0 <= float(raw_reward("ifeval_loose")("", ADVERSARIAL[name], row)) <= 1.0
