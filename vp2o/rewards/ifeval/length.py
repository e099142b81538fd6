"""IFEval `length_constraints:*`: sentences, paragraphs, words, first word of the n-th paragraph."""

from __future__ import annotations

import re

from vp2o.rewards.ifeval.base import (
    Instruction,
    check_relation,
    compare,
    register_instruction,
    to_int,
)
from vp2o.rewards.ifeval.text import count_sentences, count_words, words

__all__ = ["NthParagraphFirstWord", "NumberParagraphs", "NumberSentences", "NumberWords"]

_DIVIDER = re.compile(r"\s?\*\*\*\s?")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


@register_instruction("length_constraints:number_sentences")
class NumberSentences(Instruction):
    """Write "less than" / "at least" `num_sentences` sentences."""

    def __init__(self, num_sentences: int, relation: str) -> None:
        self.num_sentences = to_int(num_sentences, "num_sentences")
        self.relation = check_relation(relation)

    def check(self, response: str) -> bool:
        """Whether the sentence count satisfies the relation."""
        return compare(count_sentences(response), self.relation, self.num_sentences)


@register_instruction("length_constraints:number_paragraphs")
class NumberParagraphs(Instruction):
    """Write exactly `num_paragraphs` paragraphs separated by the markdown divider `***`.

    Empty text before the first or after the last divider is ignored; an empty paragraph between
    two dividers breaks the instruction.
    """

    def __init__(self, num_paragraphs: int) -> None:
        self.num_paragraphs = to_int(num_paragraphs, "num_paragraphs", minimum=1)

    def check(self, response: str) -> bool:
        """Whether there are exactly `num_paragraphs` non-empty paragraphs."""
        parts = [p.strip() for p in _DIVIDER.split(response)]
        while parts and not parts[0]:
            parts.pop(0)
        while parts and not parts[-1]:
            parts.pop()
        if any(not p for p in parts):
            return False
        return len(parts) == self.num_paragraphs


@register_instruction("length_constraints:number_words")
class NumberWords(Instruction):
    """Write "less than" / "at least" `num_words` words."""

    def __init__(self, num_words: int, relation: str) -> None:
        self.num_words = to_int(num_words, "num_words")
        self.relation = check_relation(relation)

    def check(self, response: str) -> bool:
        """Whether the word count satisfies the relation."""
        return compare(count_words(response), self.relation, self.num_words)


@register_instruction("length_constraints:nth_paragraph_first_word")
class NthParagraphFirstWord(Instruction):
    """Exactly `num_paragraphs` paragraphs (separated by blank lines); the `nth_paragraph`-th
    (1-based, counting non-empty paragraphs) starts with the word `first_word` (case-insensitive).
    """

    def __init__(self, num_paragraphs: int, nth_paragraph: int, first_word: str) -> None:
        self.num_paragraphs = to_int(num_paragraphs, "num_paragraphs", minimum=1)
        self.nth_paragraph = to_int(nth_paragraph, "nth_paragraph", minimum=1)
        if self.nth_paragraph > self.num_paragraphs:
            raise ValueError(
                f"nth_paragraph ({self.nth_paragraph}) > num_paragraphs ({self.num_paragraphs})"
            )
        tokens = words(str(first_word))
        if len(tokens) != 1:
            raise ValueError(f"first_word must be one word, got {first_word!r}")
        self.first_word = tokens[0].lower()

    def check(self, response: str) -> bool:
        """Whether the paragraph count and the n-th paragraph's first word match."""
        paragraphs = [p for p in _BLANK_LINE.split(response) if p.strip()]
        if len(paragraphs) != self.num_paragraphs:
            return False
        tokens = words(paragraphs[self.nth_paragraph - 1][:1000])
        return bool(tokens) and tokens[0].lower() == self.first_word
