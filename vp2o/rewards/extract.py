"""Answer extraction from free-form completions, shared by the `math`, `choice` and `exact` rewards.

Every function here runs in time linear in the input (bounded scans, no backtracking-prone regular
expressions), so a 1 MB completion costs milliseconds, and returns None rather than raising when
nothing usable is found.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_ANSWER_CHARS",
    "answer_phrase",
    "last_boxed",
    "last_code_block",
    "last_number",
    "strip_code_blocks",
]

MAX_ANSWER_CHARS = 1000
"""Longest extracted answer we accept; anything longer is not a final answer."""

_MAX_BOXED_TRIES = 16  # occurrences of \boxed tried from the end before giving up

_FENCED = re.compile(r"```[^\n`]*\n.*?```|~~~[^\n~]*\n.*?~~~", re.DOTALL)
_FENCE_LINE = re.compile(r"^[ \t]*(```|~~~)([^\n`~]*)$", re.MULTILINE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_PHRASE = re.compile(r"\b(?i:answer)(?:\s+is\b|\s*[:=])(?:\s*[:=])?[ \t]*")
_NUMBER = re.compile(r"(?:[-\u2212]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|[-\u2212]?\.\d+)(?:\s*\\?%)?")


def strip_code_blocks(text: str) -> str:
    """`text` without its closed fenced code blocks (``` or ~~~), each replaced by a newline."""
    return _FENCED.sub("\n", text)


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at `text[start] == "{"`; None if unbalanced or too long.

    A backslash escapes the next character, so `\\{` and `\\}` (LaTeX set braces) do not count.
    """
    depth = 0
    i = start
    end = min(len(text), start + MAX_ANSWER_CHARS + 2)
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (or `\\fbox{...}`), nested braces allowed.

    `\\boxed 5` (no braces) gives the next whitespace-delimited token. An unbalanced last box is
    skipped in favour of the one before it.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    for pos in reversed(starts[-_MAX_BOXED_TRIES:]):
        j = pos
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            content = _braced(text, j)
            if content is not None:
                return content.strip()
        elif j > pos:
            token = text[j : j + MAX_ANSWER_CHARS].split(maxsplit=1)
            if token:
                return token[0].rstrip(".$")
    return None


def answer_phrase(text: str) -> str | None:
    """What follows the last "the answer is" / "final answer:" / "Answer:" on its line.

    The phrase ends at the end of the line or at a sentence end (". " or a final "."); surrounding
    `$`, `**` and whitespace are removed.
    """
    last = None
    for last in _PHRASE.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    rest = text[last.end() : last.end() + MAX_ANSWER_CHARS]
    rest = rest.split("\n", 1)[0]
    cut = re.search(r"\.(?:\s|$)", rest)
    if cut is not None:
        rest = rest[: cut.start()]
    rest = rest.strip().strip("*").strip()
    if rest.startswith("$") and rest.endswith("$") and len(rest) > 1:
        rest = rest.strip("$").strip()
    boxed = last_boxed(rest)
    if boxed is not None:
        return boxed
    return rest or None


def last_number(text: str) -> str | None:
    """The last number in `text` (integer, decimal, 1,000 separators, a/b; a trailing % kept; a
    leading minus, ``-`` or U+2212, returned as ``-``)."""
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    value = last.group(0).rstrip(",").replace("\u2212", "-")  # U+2212 MINUS SIGN
    return value if len(value) <= 64 else None


def last_code_block(text: str) -> str | None:
    """Body of the last fenced code block; an unclosed final fence runs to the end of the text.

    Returns None when the text has no fence at all.
    """
    fences = list(_FENCE_LINE.finditer(text))
    if not fences:
        return None
    last: tuple[int, int] | None = None
    i = 0
    while i < len(fences):
        opening = fences[i]
        body_start = min(len(text), opening.end() + 1)
        j = i + 1
        while j < len(fences) and not (
            fences[j].group(1) == opening.group(1) and not fences[j].group(2).strip()
        ):
            j += 1
        if j == len(fences):
            last = (body_start, len(text))
            break
        last = (body_start, fences[j].start())
        i = j + 1
    assert last is not None
    return text[last[0] : last[1]]
