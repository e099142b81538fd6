"""IFEval `language:response_language`: the whole response is in a given language."""

from __future__ import annotations

from vp2o.rewards.ifeval.base import Instruction, register_instruction
from vp2o.rewards.ifeval.text import detect_language

__all__ = ["ResponseLanguage"]


@register_instruction("language:response_language")
class ResponseLanguage(Instruction):
    """Answer in `language` (an ISO 639-1 code such as "fr"), as detected by langdetect.

    A response whose language cannot be detected (no letters) does not follow the instruction;
    the reference implementation counts it as followed, which a reward must not do.
    """

    def __init__(self, language: str) -> None:
        if not isinstance(language, str) or not language.strip():
            raise ValueError(f"language must be an ISO 639-1 code, got {language!r}")
        self.language = language.strip().lower()

    def check(self, response: str) -> bool:
        """Whether the detected language is `language`."""
        detected = detect_language(response)
        return detected is not None and detected.split("-")[0] == self.language.split("-")[0]
