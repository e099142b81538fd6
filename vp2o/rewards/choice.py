"""The `choice` reward: multiple choice, `sample["answer"]` a letter, the options in the prompt.

The chosen letter is taken from the completion (fenced code blocks ignored), preferring explicit
phrasings, latest first: `\\boxed{C}`, "Answer: C", "the answer is (C)", "the correct option is C",
"option C is correct", "**C**"; an explicit answer that names more letters ("Answer: A or B",
"the answer is (A), (B)", "**A** or **B**") chooses nothing. Only when none of these occurs does
a bare "(C)" (the last one) or a completion that is just "C" / "C." count. Letters beyond the
options are ignored: the option count comes from `sample["options"]` / `sample["choices"]` when
given, else from option labels found in the prompt ("A.", "(B)", "C)" at the start of a line),
else A-J. "I" followed by a lower-case word ("the answer is I think ...") is the pronoun.

Row fields: `answer` (a letter such as "C" or "(C)", or a 0-based option index).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from vp2o.rewards.extract import last_boxed, strip_code_blocks
from vp2o.rewards.registry import register_reward

__all__ = ["choice_reward", "extract_choice", "gold_letter", "option_letters"]

_LETTERS = string.ascii_uppercase[:10]  # A-J (MMLU-Pro has 10 options)
# "I" followed by a lower-case word or an apostrophe is the pronoun ("the answer is I think B")
_LETTER = r"(?:[A-HJ]|I(?![ \t]+[a-z]|['\u2019]))"
_L = r"[\(\[\*]*\s*(" + _LETTER + r")\s*[\)\]\*]*(?![A-Za-z0-9])"
_IS = r"(?:\s+is\b\s*[:=]?|\s*[:=])"
_STRONG = [
    re.compile(r"(?i:\banswer)" + _IS + r"\s*(?i:option\s+|choice\s+)?" + _L),
    re.compile(
        r"(?i:\b(?:correct|right|best)\s+(?:option|choice|answer|letter))" + _IS + r"?\s*" + _L
    ),
    # a lower-case letter only when nothing but punctuation follows it on the line
    re.compile(r"(?i:\banswer)" + _IS + r"\s*[\(\[\*]*([a-j])[\)\]\*]*\.?[ \t]*$", re.MULTILINE),
    re.compile(
        r"(?i:\b(?:option|choice))\s+\(?([A-J])\)?\s+(?i:is\s+(?:the\s+)?(?:correct|right))"
    ),
    re.compile(r"\*\*\(?([A-J])\)?[\.:]?\*\*"),
]
_WEAK = re.compile(r"\(([A-J])\)")
_HEDGE = re.compile(
    r"[^\S\n]*(?:,|/|\bor\b|\band\b|&)[^\S\n]*[\(\[\*]*" + _LETTER + r"(?![A-Za-z0-9])")
_HEDGED_AFTER = re.compile(
    r"(?<![A-Za-z0-9])[A-J][\)\]\*]*[^\S\n]*(?:,|/|\bor\b|&)[^\S\n]*$")
_NEWLINES = re.compile(r"[^\S\n]*\n\s*")
_SPACES = re.compile(r"[^\S\n]{2,}")
_ALONE = re.compile(r"\s*[\(\[]?([A-J])[\)\]]?[\.:]?\s*")
_PROMPT_LABEL = re.compile(r"^\s*\(?([A-J])[\)\.:]\s+\S", re.MULTILINE)


def option_letters(prompt: str, sample: Mapping[str, Any]) -> str:
    """The valid option letters for this row (see the module docstring)."""
    options = sample.get("options", sample.get("choices"))
    if isinstance(options, list | tuple) and 0 < len(options) <= len(_LETTERS):
        return _LETTERS[: len(options)]
    labels = {m.group(1) for m in _PROMPT_LABEL.finditer(prompt)}
    if "A" in labels and "B" in labels:
        return _LETTERS[: _LETTERS.index(max(labels)) + 1]
    return _LETTERS


def gold_letter(sample: Mapping[str, Any]) -> str | None:
    """The gold letter of a row, or None if `answer` is not a letter or index."""
    answer = sample.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        return _LETTERS[answer] if 0 <= answer < len(_LETTERS) else None
    if not isinstance(answer, str):
        return None
    match = _ALONE.fullmatch(answer.upper())
    return match.group(1) if match else None


def extract_choice(completion: str, letters: str = _LETTERS) -> str | None:
    """The letter chosen in `completion`, restricted to `letters`; None when there is none."""
    # one character per whitespace run: the patterns' adjacent \s* then cannot backtrack
    # polynomially over a long run (seconds for 2 KB of spaces). Spaces first: _NEWLINES'
    # leading [^\S\n]* would rescan a long space run from each of its positions (quadratic).
    text = _NEWLINES.sub("\n", _SPACES.sub(" ", strip_code_blocks(completion)))
    boxed = last_boxed(text)
    best: tuple[int, str] | None = None
    for pattern in _STRONG:
        for match in pattern.finditer(text):
            letter = match.group(1).upper()
            if letter in letters and (best is None or match.start() > best[0]):
                hedged = (_HEDGE.match(text, match.end()) is not None  # "A or B", "A, B, C"
                          or _HEDGED_AFTER.search(text[max(0, match.start() - 24):match.start()])
                          is not None)  # "**A** or **B**"
                best = (match.start(), "" if hedged else letter)
    if boxed is not None:
        inner = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", boxed)
        match = _ALONE.fullmatch(inner)
        if match and match.group(1) in letters:
            return match.group(1)
    if best is not None:
        return best[1] or None  # a hedged answer chooses nothing
    alone = _ALONE.fullmatch(text.strip()[:16]) if len(text.strip()) <= 16 else None
    if alone and alone.group(1) in letters:
        return alone.group(1)
    weak = [m.group(1) for m in _WEAK.finditer(text) if m.group(1) in letters]
    return weak[-1] if weak else None


@register_reward("choice")
def choice_reward(prompt: str, completion: str, sample: Mapping[str, Any]) -> float:
    """1.0 if the letter chosen in `completion` is `sample["answer"]`, else 0.0."""
    gold = gold_letter(sample)
    if gold is None:
        return 0.0
    chosen = extract_choice(completion, option_letters(prompt, sample))
    return 1.0 if chosen == gold else 0.0
