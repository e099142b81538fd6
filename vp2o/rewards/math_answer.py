"""The `math` reward: extract the final answer, compare it with `sample["answer"]` by math-verify.

Extraction (fenced code blocks are ignored: an answer only printed by code does not count):

1. the last balanced `\\boxed{...}` / `\\fbox{...}` (nested braces allowed);
2. else what follows the last "the answer is" / "Final answer:" / "Answer:" on its line;
3. else the last number in the text.

The extracted string is cleaned (surrounding `$`, `\\(...\\)`, trailing units such as
`\\text{ cm}` or "dollars" after a number, degree signs) and compared with the gold answer: first an
exact comparison after whitespace and LaTeX-spacing normalisation, then math-verify (LaTeX,
fractions, decimals, sets, intervals, symbolic expressions) in a worker process with a hard
timeout (`MathVerifier`). Percent signs are dropped from the prediction unless the row sets
`allow_percent`, in which case `50\\%` also equals `0.5`.

Row fields: `answer` (str or number, or a list of accepted answers), `allow_percent` (optional).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from vp2o.rewards.extract import (
    MAX_ANSWER_CHARS,
    answer_phrase,
    last_boxed,
    last_number,
    strip_code_blocks,
)
from vp2o.rewards.math_verifier import MathVerifier
from vp2o.rewards.registry import register_reward

__all__ = ["MathReward", "clean_answer", "extract_math_answer", "gold_answers"]

_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_UNIT = re.compile(r"^(.*?\d)\s*\\(?:text|mathrm|mbox|textrm)\s*\{[A-Za-z .]*\}$", re.DOTALL)
_WORD_UNIT = re.compile(r"^([-+]?[\d.,/ ]*\d)\s+[A-Za-z][A-Za-z .]*$")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_PERCENT = re.compile(r"\\?%|\\text\{\s*\\?%\s*\}")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SIMPLE_NUMBER = re.compile(r"[-+]?\d{1,40}(?:\.\d{1,40})?|[-+]?\d{1,40}/\d{1,40}")


def clean_answer(answer: str, *, allow_percent: bool) -> str:
    """Strip delimiters, trailing units and degree signs (and `%` unless allowed) from an answer."""
    text = answer.strip()
    for left, right in _DELIMS:
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left) : len(text) - len(right)].strip()
            break
    text = text.rstrip(".").strip()
    text = _DEGREE.sub("", text).strip()
    if not allow_percent:
        text = _PERCENT.sub("", text).strip()
    for pattern in (_TEXT_UNIT, _WORD_UNIT):
        match = pattern.match(text)
        if match is not None:
            text = match.group(1).strip()
    return text


def extract_math_answer(completion: str) -> str | None:
    """The final answer of `completion` (boxed, "the answer is", or last number), uncleaned."""
    text = strip_code_blocks(completion)
    for extractor in (last_boxed, answer_phrase, last_number):
        answer = extractor(text)
        if answer:
            return answer
    return None


def gold_answers(sample: Mapping[str, Any]) -> list[str]:
    """The accepted answers of a row as strings (a boxed gold answer is unboxed)."""
    raw = sample.get("answer")
    values = raw if isinstance(raw, list | tuple) else [raw]
    golds = []
    for value in values:
        if value is None or isinstance(value, bool):
            continue
        text = str(value).strip()
        boxed = last_boxed(text)
        if boxed:
            text = boxed
        if text:
            golds.append(text)
    return golds


def _normal_form(text: str) -> str:
    text = re.sub(r"\\(?:left|right|displaystyle)\b|\\[,;:! ]|\s+", "", text)
    return text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def _without_thousands_commas(text: str) -> str:
    """``1,234,567.5`` -> ``1234567.5``; any other comma stays (``1,2`` is a pair, not 12)."""
    text = text.strip()
    return text.replace(",", "") if _THOUSANDS.fullmatch(text) else text


def _fast_equal(gold: str, pred: str) -> bool:
    """Cheap in-process equality (no sympy): same normal form, or equal simple numbers."""
    if _normal_form(gold) == _normal_form(pred):
        return True
    g, p = _without_thousands_commas(gold), _without_thousands_commas(pred)
    if _SIMPLE_NUMBER.fullmatch(g) and _SIMPLE_NUMBER.fullmatch(p):
        try:
            return Fraction(g) == Fraction(p)
        except (ValueError, ZeroDivisionError):
            return False
    return False


class MathReward:
    """Final-answer equivalence reward; 1.0 if the extracted answer equals a gold answer.

    Args:
        timeout_s: Hard wall-clock bound of one math-verify check.
        max_workers: Checks that may run at once (one child process each).
        verifier: Use this `MathVerifier` instead of building one (shared between rewards).
    """

    def __init__(
        self, timeout_s: float = 5.0, max_workers: int = 4, verifier: MathVerifier | None = None
    ) -> None:
        self.verifier = verifier or MathVerifier(timeout_s=timeout_s, max_workers=max_workers)

    def __call__(self, prompt: str, completion: str, sample: Mapping[str, Any]) -> float:
        """Score one completion (see the module docstring)."""
        golds = gold_answers(sample)
        raw = extract_math_answer(completion)
        if not golds or raw is None or len(raw) > MAX_ANSWER_CHARS:
            return 0.0
        allow_percent = bool(sample.get("allow_percent", False))
        pred = clean_answer(raw, allow_percent=allow_percent)
        if not pred or "\x00" in pred:
            return 0.0
        for gold in golds:
            gold = clean_answer(gold, allow_percent=True)
            if _fast_equal(gold, pred):
                return 1.0
        for gold in golds:
            gold = clean_answer(gold, allow_percent=True)
            if self.verifier.equivalent(gold, pred):
                return 1.0
        return 0.0


register_reward("math")(MathReward())
