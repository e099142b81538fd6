"""IFEval `detectable_format:*`: bullets, fixed answers, highlights, sections, JSON, title."""

from __future__ import annotations

import json
import re

from vp2o.rewards.ifeval.base import Instruction, register_instruction, to_int

__all__ = [
    "ConstrainedResponse",
    "JsonFormat",
    "MultipleSections",
    "NumberBulletLists",
    "NumberHighlightedSections",
    "Title",
]

_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
_HIGHLIGHT = re.compile(r"\*\*([^\n*]+)\*\*|\*([^\n*]+)\*")
_FENCE_OPEN = re.compile(r"^```[A-Za-z]*\s*")
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@register_instruction("detectable_format:number_bullet_lists")
class NumberBulletLists(Instruction):
    """Use exactly `num_bullets` markdown bullet points ("* item" or "- item")."""

    def __init__(self, num_bullets: int) -> None:
        self.num_bullets = to_int(num_bullets, "num_bullets")

    def check(self, response: str) -> bool:
        """Whether the number of bullet lines is exactly `num_bullets`."""
        return len(_BULLET.findall(response)) == self.num_bullets


@register_instruction("detectable_format:constrained_response")
class ConstrainedResponse(Instruction):
    """Answer with one of "My answer is yes.", "My answer is no.", "My answer is maybe."."""

    def check(self, response: str) -> bool:
        """Whether one of the fixed answers appears in the response."""
        text = response.strip()
        return any(option in text for option in CONSTRAINED_OPTIONS)


@register_instruction("detectable_format:number_highlighted_sections")
class NumberHighlightedSections(Instruction):
    """Highlight at least `num_highlights` sections with markdown, `*like this*` (or `**bold**`)."""

    def __init__(self, num_highlights: int) -> None:
        self.num_highlights = to_int(num_highlights, "num_highlights")

    def check(self, response: str) -> bool:
        """Whether there are enough non-empty highlighted spans (on one line each)."""
        spans = [a or b for a, b in _HIGHLIGHT.findall(response)]
        return sum(1 for s in spans if s.strip()) >= self.num_highlights


@register_instruction("detectable_format:multiple_sections")
class MultipleSections(Instruction):
    """Have at least `num_sections` sections, each starting with "`section_spliter` N"
    (e.g. "SECTION 1"); the splitter is case-sensitive, as in IFEval.
    """

    def __init__(self, section_spliter: str, num_sections: int) -> None:
        if not isinstance(section_spliter, str) or not section_spliter.strip():
            raise ValueError(f"section_spliter must be a non-empty string, got {section_spliter!r}")
        self.section_spliter = section_spliter.strip()
        self.num_sections = to_int(num_sections, "num_sections")
        self._pattern = re.compile(r"\s?" + re.escape(self.section_spliter) + r"\s?\d+\s?")

    def check(self, response: str) -> bool:
        """Whether the splitter followed by a number occurs at least `num_sections` times."""
        return len(self._pattern.split(response)) - 1 >= self.num_sections


@register_instruction("detectable_format:json_format")
class JsonFormat(Instruction):
    """The entire output is valid JSON (a surrounding ```json fence is allowed)."""

    def check(self, response: str) -> bool:
        """Whether the (unfenced) response parses as JSON."""
        text = _FENCE_OPEN.sub("", response.strip())
        if text.endswith("```"):  # not re.sub(r"\s*```$"): it rescans every whitespace run to
            text = text[:-3].rstrip()  # its end from each of its positions (quadratic)
        try:
            json.loads(text)
        except Exception:  # noqa: BLE001 - ValueError, RecursionError on deep nesting, ...
            return False
        return True


@register_instruction("detectable_format:title")
class Title(Instruction):
    """Include a title wrapped in double angular brackets, `<<like this>>`."""

    def check(self, response: str) -> bool:
        """Whether a non-empty `<<...>>` title (on one line) occurs."""
        return any(t.strip() for t in titles(response))


def titles(text: str) -> list[str]:
    """The `<<...>>` titles of `text`, left to right: from each `<<` to the first `>>` after at
    least one character, on one line (what ``re.findall(r"<<([^\\n]+?)>>", text)`` returns). A
    scan, not that regex: the regex retries every `<` of a long run to the end of its line,
    quadratic time (5 s for 32 KB of `<`)."""
    found, i, n = [], 0, len(text)
    while (start := text.find("<<", i)) >= 0:
        line_end = text.find("\n", start + 2)
        line_end = n if line_end < 0 else line_end
        close = text.find(">>", start + 3, line_end)
        if close < 0:  # no title starts on this line after `start`
            if line_end == n:
                break
            i = line_end + 1
            continue
        found.append(text[start + 2:close])
        i = close + 2
    return found
