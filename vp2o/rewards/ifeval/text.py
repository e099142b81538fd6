"""Text helpers for the IFEval checkers: words, sentences, paragraphs, language.

Everything here works without downloaded data: words come from nltk's `RegexpTokenizer(r"\\w+")`,
sentences from nltk's Punkt algorithm with hand-given parameters (a list of common abbreviations)
instead of the trained `punkt` model, which cannot be fetched at run time. Language detection
uses langdetect, which ships its profiles, through a private factory seeded with 0 (langdetect is
otherwise non-deterministic), without touching langdetect's global factory.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = [
    "count_sentences",
    "count_words",
    "detect_language",
    "split_sentences",
    "words",
]

_MAX_LANGDETECT_CHARS = 10_000

_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "etc", "e.g", "i.e",
    "cf", "al", "approx", "inc", "ltd", "co", "corp", "dept", "est", "fig", "no", "vol", "jan",
    "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "u.k",
    "a.m", "p.m", "ph.d", "gen", "gov", "sen", "rep", "capt", "lt", "col", "sgt",
}  # fmt: skip


@functools.cache
def _word_tokenizer() -> Any:
    from nltk.tokenize import RegexpTokenizer  # imported on first use: nltk takes ~0.5 s

    return RegexpTokenizer(r"\w+")


@functools.cache
def _sentence_tokenizer() -> Any:
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(_ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def words(text: str) -> list[str]:
    """Word tokens (runs of letters, digits and underscores)."""
    return _word_tokenizer().tokenize(text)


def count_words(text: str) -> int:
    """Number of `words` in `text`."""
    return len(words(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (Punkt with fixed abbreviations; newlines also end a sentence)."""
    tokenizer = _sentence_tokenizer()
    sentences: list[str] = []
    for block in re.split(r"\n\s*\n|\n(?=\s*(?:[-*•]|\d+[.)])\s)", text):
        if block.strip():
            sentences.extend(s for s in tokenizer.tokenize(block) if s.strip())
    return sentences


def count_sentences(text: str) -> int:
    """Number of `split_sentences` of `text`."""
    return len(split_sentences(text))


@functools.cache
def _language_factory() -> Any:
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.seed = 0
    factory.load_profile(PROFILES_DIRECTORY)
    return factory


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of the language of `text` (e.g. "en"), or None if undetectable."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_factory().create()
    detector.append(text[:_MAX_LANGDETECT_CHARS])
    try:
        return detector.detect()
    except LangDetectException:
        return None
