"""The `exact` reward: normalised exact match against `sample["answer"]`.

Normalisation (SQuAD style, plus Unicode): NFKC, lower case, punctuation removed, the articles
"a", "an", "the" removed, whitespace collapsed. The completion matches when one of these candidates
equals one of the gold answers after normalisation: the last `\\boxed{...}`, what follows the last
"the answer is" / "Answer:", the last non-empty line, or the whole completion. Fenced code blocks
are ignored.

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
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """NFKC, lower case, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@register_reward("exact")
def exact_reward(prompt: str, completion: str, sample: Mapping[str, Any]) -> float:
    """1.0 if a candidate answer of `completion` equals a gold answer after `normalize`."""
    raw = sample.get("answer")
    values = raw if isinstance(raw, list | tuple) else [raw]
    golds = {normalize(str(v)) for v in values if v is not None and not isinstance(v, bool)}
    golds.discard("")
    if not golds:
        return 0.0
    text = strip_code_blocks(completion)
    lines = [line for line in text[-_MAX_CHARS:].splitlines() if line.strip()]
    candidates = [last_boxed(text), answer_phrase(text), lines[-1] if lines else None]
    if len(text) <= _MAX_CHARS:
        candidates.append(text)
    return 1.0 if any(c and normalize(c) in golds for c in candidates) else 0.0
