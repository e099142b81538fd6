"""The `exact` reward: normalised exact match against `sample["answer"]`.

Normalisation (SQuAD style, plus Unicode): NFKC, lower case, punctuation replaced by spaces, the
articles "a", "an", "the" removed, whitespace collapsed. Punctuation that changes what an answer
means stays: a number's minus sign (`-5` is not `5`; U+2212 reads as `-`; `+4` is `4`), a
decimal point or a comma between digits (`3.5` is not `3 5`), and `+`/`#` ending a word (`C++`,
`C#`). A gold answer that is only an article ("A", an option letter) is compared with the
articles kept. The completion's answer is the first of these that it has: the last
`\\boxed{...}`, else what follows the last "the answer is" / "Answer:", else its last non-empty
line; it matches when it equals one of the gold answers after normalisation. One answer per
completion: a box, an "Answer:" and a last line that name three different answers are not
three guesses. Fenced code blocks are ignored.

Row fields: `answer` (a string, or a list of accepted strings).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from vp2o.rewards.extract import answer_phrase, last_boxed, strip_code_blocks
from vp2o.rewards.registry import register_reward

__all__ = ["exact_reward", "normalize"]

_MAX_CHARS = 10_000
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# punctuation, except: a number's sign, a point or comma between digits, "+"/"#" ending a word
_PUNCT = re.compile(
    r"(?!(?<![\w.])-(?=\.?\d))"  # not a number's minus sign (a "+" sign goes: +4 is 4)
    r"(?!(?<=\d)[.,](?=\d))"  # not a decimal point or a thousands comma
    r"(?!(?<![\w.])\.(?=\d))"  # not the point of ".5" / "-.5"
    r"(?!(?<=[^\W\d_]|\+)[+#](?![\w]))"  # not the "+"/"#" ending a word: C++, C#
    r"[^\w\s]"
)


def normalize(text: str, *, articles: bool = False) -> str:
    """NFKC, lower case, punctuation as spaces (but see the module docstring), no articles
    (kept with ``articles``), single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2212", "-")
    text = _PUNCT.sub(" ", text)
    if not articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@register_reward("exact")
def exact_reward(prompt: str, completion: str, sample: Mapping[str, Any]) -> float:
    """1.0 if the answer of `completion` (module docstring) equals a gold answer after
    `normalize`."""
    raw = sample.get("answer")
    values = raw if isinstance(raw, list | tuple) else [raw]
    golds, article_golds = set(), set()  # the latter: golds that are only an article ("A")
    for v in values:
        if v is None or isinstance(v, bool):
            continue
        if gold := normalize(str(v)):
            golds.add(gold)
        elif gold := normalize(str(v), articles=True):
            article_golds.add(gold)
    if not golds and not article_golds:
        return 0.0
    text = strip_code_blocks(completion)
    answer = last_boxed(text)
    if answer is None:
        answer = answer_phrase(text)
    if answer is None:
        lines = [line for line in text[-_MAX_CHARS:].splitlines() if line.strip()]
        answer = lines[-1] if lines else None
    if not answer:
        return 0.0
    return 1.0 if (normalize(answer) in golds
                   or normalize(answer, articles=True) in article_golds) else 0.0
