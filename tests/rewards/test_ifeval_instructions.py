"""Every IFEval instruction: at least one response that follows it and one that violates it."""

from __future__ import annotations

import pytest
from ifeval_cases import CASES

from vp2o.rewards.ifeval import INSTRUCTIONS, build_instruction


def test_every_public_instruction_is_implemented_and_tested():
    assert len(INSTRUCTIONS) == 25
    assert set(CASES) == set(INSTRUCTIONS)


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_following_responses(instruction_id):
    kwargs, following, _ = CASES[instruction_id]
    instruction = build_instruction(instruction_id, kwargs)
    for response in following:
        assert instruction.check(response), response


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_violating_responses(instruction_id):
    kwargs, _, violating = CASES[instruction_id]
    instruction = build_instruction(instruction_id, kwargs)
    for response in violating:
        assert not instruction.check(response), response


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "response", "expected"),
    [
        (
            "keywords:frequency",
            {"keyword": "cat", "frequency": 2, "relation": "less than"},
            "cat",
            True,
        ),
        (
            "keywords:frequency",
            {"keyword": "cat", "frequency": 2, "relation": "less than"},
            "cat cat",
            False,
        ),
        (
            "keywords:letter_frequency",
            {"letter": "A", "let_frequency": 3, "let_relation": "less than"},
            "a A",
            True,
        ),
        (
            "keywords:letter_frequency",
            {"letter": "a", "let_frequency": 3, "let_relation": "less than"},
            "aaa",
            False,
        ),
        (
            "length_constraints:number_sentences",
            {"num_sentences": 2, "relation": "at least"},
            "Go now. Stop here.",
            True,
        ),
        (
            "length_constraints:number_words",
            {"num_words": 3, "relation": "less than"},
            "one two",
            True,
        ),
        (
            "length_constraints:number_words",
            {"num_words": 3, "relation": "less than"},
            "one two three",
            False,
        ),
        (
            "change_case:capital_word_frequency",
            {"capital_frequency": 2, "capital_relation": "less than"},
            "ONE two",
            True,
        ),
        ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S bye", True),
        ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. bye", False),
        (
            "detectable_format:multiple_sections",
            {"section_spliter": "SECTION", "num_sections": 1},
            "SECTION 1\nx",
            True,
        ),
    ],
)
def test_relations_and_variants(instruction_id, kwargs, response, expected):
    assert build_instruction(instruction_id, kwargs).check(response) is expected


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "error"),
    [
        (
            "keywords:frequency",
            {"keyword": "a", "frequency": 2, "relation": "more than"},
            ValueError,
        ),
        (
            "keywords:frequency",
            {"keyword": "a", "frequency": -1, "relation": "at least"},
            ValueError,
        ),
        (
            "keywords:frequency",
            {"keyword": "a", "frequency": 2.5, "relation": "at least"},
            ValueError,
        ),
        ("keywords:frequency", {"keyword": "a"}, TypeError),
        ("keywords:existence", {"keywords": "apple"}, ValueError),
        (
            "keywords:letter_frequency",
            {"letter": "ab", "let_frequency": 1, "let_relation": "at least"},
            ValueError,
        ),
        (
            "length_constraints:nth_paragraph_first_word",
            {"num_paragraphs": 1, "nth_paragraph": 2, "first_word": "x"},
            ValueError,
        ),
        ("detectable_format:title", {"unexpected": 1}, TypeError),
        ("no:such_instruction", {}, ValueError),
    ],
)
def test_bad_kwargs_raise(instruction_id, kwargs, error):
    with pytest.raises(error):
        build_instruction(instruction_id, kwargs)


def test_unknown_id_lists_choices():
    with pytest.raises(ValueError, match="punctuation:no_comma"):
        build_instruction("no:such", {})


def test_none_padded_kwargs_are_accepted():
    padded = dict.fromkeys(["num_highlights", "relation", "num_words", "keywords", "language"])
    padded.update(num_words=3, relation="at least")
    assert build_instruction("length_constraints:number_words", padded).check("a b c")
    assert build_instruction("punctuation:no_comma", dict.fromkeys(padded)).check("a b")
    assert build_instruction(
        "length_constraints:number_words", {"num_words": "3", "relation": "at least"}
    )


def test_the_title_scan_finds_what_the_lazy_regex_finds():
    """``formats.titles`` replaces ``re.findall(r"<<([^\\n]+?)>>")`` (quadratic over a run of
    ``<``): the same titles on random strings of the characters that matter."""
    import random
    import re

    from vp2o.rewards.ifeval.formats import titles

    rng, reference = random.Random(0), re.compile(r"<<([^\n]+?)>>")
    for _ in range(5_000):
        text = "".join(rng.choice("<> \nab") for _ in range(rng.randint(0, 24)))
        assert titles(text) == reference.findall(text), text


LONG_RUNS = {name: run * (100_000 // len(run)) for name, run in (
    ("spaces", " "), ("newlines", "\n"), ("mixed", " \n\t"), ("angles", "<"), ("brackets", "["),
    ("stars", "*"), ("fences", "```\n"), ("dots", ". "))}


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_long_runs_take_linear_time(instruction_id):
    """100,000 characters of one repeated run inside a response: a check that is worse than
    linear on such a run takes minutes (a regex like r"\\s*```$" rescans a whitespace run from
    each of its positions: 16 s for 60,000 spaces); a linear one takes well under a second, so a
    5 s bound holds on a loaded machine."""
    import time

    kwargs, _, _ = CASES[instruction_id]
    instruction = build_instruction(instruction_id, kwargs)
    for name, run in LONG_RUNS.items():
        t0 = time.perf_counter()
        instruction.check("{" + run + "x")
        assert time.perf_counter() - t0 < 5.0, name
