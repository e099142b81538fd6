"""IFEval `keywords:*` instructions: keywords present, counted, forbidden; letter frequency."""

from __future__ import annotations

import re
from typing import Any

from vp2o.rewards.ifeval.base import (
    Instruction,
    check_relation,
    compare,
    register_instruction,
    to_int,
)
from vp2o.rewards.ifeval.text import skeleton

__all__ = ["ForbiddenWords", "KeywordExistence", "KeywordFrequency", "LetterFrequency"]


def _word_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    words = [str(v).strip() for v in value if str(v).strip()]
    if not words:
        raise ValueError(f"{name} must not be empty")
    return words


def _word_pattern(word: str) -> re.Pattern[str]:
    """Case-insensitive whole-word match (also for words that start or end with punctuation)."""
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE)


@register_instruction("keywords:existence")
class KeywordExistence(Instruction):
    """Include every one of `keywords` (case-insensitive, as whole words)."""

    def __init__(self, keywords: list[str]) -> None:
        self.keywords = _word_list(keywords, "keywords")

    def check(self, response: str) -> bool:
        """Whether every keyword occurs."""
        return all(_word_pattern(k).search(response) for k in self.keywords)


@register_instruction("keywords:frequency")
class KeywordFrequency(Instruction):
    """Use `keyword` "less than" / "at least" `frequency` times (case-insensitive, whole word)."""

    def __init__(self, keyword: str, frequency: int, relation: str) -> None:
        self.keyword = _word_list([keyword], "keyword")[0]
        self.frequency = to_int(frequency, "frequency")
        self.relation = check_relation(relation)

    def check(self, response: str) -> bool:
        """Whether the keyword count satisfies the relation."""
        count = len(_word_pattern(self.keyword).findall(response))
        return compare(count, self.relation, self.frequency)


@register_instruction("keywords:forbidden_words")
class ForbiddenWords(Instruction):
    """Do not use any of `forbidden_words` (case-insensitive, as whole words, also when written
    with look-alike letters or invisible characters: `text.skeleton`)."""

    def __init__(self, forbidden_words: list[str]) -> None:
        self.forbidden_words = _word_list(forbidden_words, "forbidden_words")
        self._patterns = [_word_pattern(skeleton(w)) for w in self.forbidden_words]

    def check(self, response: str) -> bool:
        """Whether no forbidden word occurs in the response as a reader sees it."""
        seen = skeleton(response)
        return not any(p.search(seen) for p in self._patterns)


@register_instruction("keywords:letter_frequency")
class LetterFrequency(Instruction):
    """Letter `letter` appears "less than" / "at least" `let_frequency` times (case-insensitive)."""

    def __init__(self, letter: str, let_frequency: int, let_relation: str) -> None:
        if not isinstance(letter, str) or len(letter) != 1 or not letter.isalpha():
            raise ValueError(f"letter must be a single letter, got {letter!r}")
        self.letter = letter.lower()
        self.let_frequency = to_int(let_frequency, "let_frequency")
        self.let_relation = check_relation(let_relation, "let_relation")

    def check(self, response: str) -> bool:
        """Whether the letter count satisfies the relation."""
        count = response.lower().count(self.letter)
        return compare(count, self.let_relation, self.let_frequency)
