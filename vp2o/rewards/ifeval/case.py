"""IFEval `change_case:*`: all capitals, all lower case, number of all-capital words."""

from __future__ import annotations

from vp2o.rewards.ifeval.base import (
    Instruction,
    check_relation,
    compare,
    register_instruction,
    to_int,
)
from vp2o.rewards.ifeval.text import detect_language, words

__all__ = ["CapitalWordFrequency", "EnglishCapital", "EnglishLowercase"]


@register_instruction("change_case:capital_word_frequency")
class CapitalWordFrequency(Instruction):
    """Use all-capital words "less than" / "at least" `capital_frequency` times."""

    def __init__(self, capital_frequency: int, capital_relation: str) -> None:
        self.capital_frequency = to_int(capital_frequency, "capital_frequency")
        self.capital_relation = check_relation(capital_relation, "capital_relation")

    def check(self, response: str) -> bool:
        """Whether the count of all-capital words satisfies the relation."""
        count = sum(1 for w in words(response) if w.isupper())
        return compare(count, self.capital_relation, self.capital_frequency)


@register_instruction("change_case:english_capital")
class EnglishCapital(Instruction):
    """Respond in English, in capital letters only."""

    def check(self, response: str) -> bool:
        """Whether the response has no lower-case letter and is detected as English."""
        return response.isupper() and detect_language(response) == "en"


@register_instruction("change_case:english_lowercase")
class EnglishLowercase(Instruction):
    """Respond in English, in lower-case letters only."""

    def check(self, response: str) -> bool:
        """Whether the response has no capital letter and is detected as English."""
        return response.islower() and detect_language(response) == "en"
