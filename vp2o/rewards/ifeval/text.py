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
import unicodedata
from typing import Any

__all__ = [
    "count_sentences",
    "count_words",
    "detect_language",
    "skeleton",
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


# Cyrillic and Greek letters drawn like a Latin letter in common fonts (after NFKC, which already
# folds full-width, mathematical and other compatibility forms into ASCII).
_LOOKALIKES = str.maketrans({
    # Cyrillic lower case: a e o p c y x i j s d h q w k
    **dict(zip("\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0456\u0458\u0455\u0501\u04bb\u051b"
               "\u051d\u043a", "aeopcyxijsdhqwk", strict=True)),
    # Cyrillic upper case: A B E K M H O P C T X I J S Y
    **dict(zip("\u0410\u0412\u0415\u041a\u041c\u041d\u041e\u0420\u0421\u0422\u0425\u0406\u0408"
               "\u0405\u0423", "ABEKMHOPCTXIJSY", strict=True)),
    # Greek lower case: alpha omicron nu iota kappa rho upsilon chi
    **dict(zip("\u03b1\u03bf\u03bd\u03b9\u03ba\u03c1\u03c5\u03c7", "aovikpux", strict=True)),
    # Greek upper case: A B E Z H I K M N O P T Y X
    **dict(zip("\u0391\u0392\u0395\u0396\u0397\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a5"
               "\u03a7", "ABEZHIKMNOPTYX", strict=True)),
    "\u0131": "i",  # Latin dotless i
})


def skeleton(text: str) -> str:
    """`text` as a reader sees it: NFKC forms, no invisible format characters (zero-width space,
    soft hyphen, ...) or combining marks (strike-through, accents), and Latin letters for the
    Cyrillic and Greek letters drawn alike. For checks a look-alike must not pass: a forbidden
    word written with a Cyrillic "a" (U+0430) or a zero-width space inside it, a full-width
    comma."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
    return unicodedata.normalize("NFKC", kept).translate(_LOOKALIKES)


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
