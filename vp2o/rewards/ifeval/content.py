"""IFEval `detectable_content:*`: square-bracket placeholders and a postscript."""

from __future__ import annotations

import re

from vp2o.rewards.ifeval.base import Instruction, register_instruction, to_int

__all__ = ["NumberPlaceholders", "Postscript"]

# a bracket pair with no bracket or newline inside; non-blank is checked after (an \S between two
# [^...]* runs backtracks quadratically over a long blank run)
_PLACEHOLDER = re.compile(r"\[([^\[\]\n]*)\]")


@register_instruction("detectable_content:number_placeholders")
class NumberPlaceholders(Instruction):
    """Include at least `num_placeholders` placeholders in square brackets, e.g. `[address]`."""

    def __init__(self, num_placeholders: int) -> None:
        self.num_placeholders = to_int(num_placeholders, "num_placeholders")

    def check(self, response: str) -> bool:
        """Whether there are enough non-empty `[...]` placeholders."""
        found = sum(1 for inner in _PLACEHOLDER.findall(response) if inner.strip())
        return found >= self.num_placeholders


def _marker_pattern(marker: str) -> re.Pattern[str]:
    """Case-insensitive pattern for `marker` at the start of a line, spaces after dots optional.

    Markdown emphasis or a quote sign may precede it ("**P.S.** ...", "> P.S. ...").
    """
    body = "".join(re.escape(c) + (r"\s?" if c == "." else "") for c in marker.strip())
    return re.compile(r"^[ \t>*_#]*" + body, re.IGNORECASE | re.MULTILINE)


@register_instruction("detectable_content:postscript")
class Postscript(Instruction):
    """End with a postscript: a line starting with `postscript_marker` (e.g. "P.S.", "P.P.S")."""

    def __init__(self, postscript_marker: str) -> None:
        if not isinstance(postscript_marker, str) or not postscript_marker.strip():
            raise ValueError(
                f"postscript_marker must be a non-empty string, got {postscript_marker!r}"
            )
        self.postscript_marker = postscript_marker.strip()
        self._pattern = _marker_pattern(self.postscript_marker)

    def check(self, response: str) -> bool:
        """Whether some line starts with the marker."""
        return self._pattern.search(response) is not None
