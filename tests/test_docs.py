"""README.md and docs/*.md describe the software as it is; how it got there is `git log`'s.

A measured number says when, where and with which command (or commit) it was measured, not in
which round of work: "session 5", "in sessions 2-4", "(session-6 demo)" or "fixed earlier"
narrate history and go stale. The patterns are narrow on purpose: "a wandb session",
`session.claim_run_dir` (vp2o/session.py) and bubblewrap's `--new-session` are not history.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

HISTORY = re.compile(
    r"\bsessions?[ -]\d"  # session 5, session-6, sessions 2-4
    r"|\bin sessions\b"
    r"|\b(?:this|that|previous|next|last|earlier|later|first|second|third) session\b"
    r"|\brounds? of work\b"
    r"|\bin earlier rounds\b"
    r"|\bfixed earlier\b",
    re.IGNORECASE,
)


def history_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that narrates the project's history."""
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if HISTORY.search(line)]


@pytest.mark.parametrize(
    "line",
    [
        "Whole demo 8 min 26 s (session 5; 9 min 13 s in session 6)",
        "0.479, 0.519 and 0.503 in sessions 2-4",
        "(SFT 0.439; session 2, before the tie rule)",
        "**NVIDIA H200, session-6** (lent machine)",
        "Tried in Session 3, measured",
        "A second call, after this session's trainer changes",
        "figures changed over earlier rounds of work",
        "the xfail rows were stale (fixed earlier)",
    ],
)
def test_history_is_flagged(line: str) -> None:
    assert history_lines(line) == [(1, line)]


@pytest.mark.parametrize(
    "line",
    [
        "resume the same wandb session after a requeue",
        "each loop refuses the other's folder (`session.claim_run_dir`)",
        "with `--new-session` and `start_new_session=True`",
        "One session context manager for train/sft/eval",
        "8 rounds, 24 pairs; the same round of the benchmark",
        "measured 2026-11-27 on the H200, code as of commit 0977515",
    ],
)
def test_present_tense_is_not_flagged(line: str) -> None:
    assert history_lines(line) == []


def test_docs_tell_no_history() -> None:
    assert len(DOCS) > 5, DOCS  # README and the docs folder were found
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in DOCS
        for n, line in history_lines(path.read_text(encoding="utf-8"))
    ]
    assert not found, (
        "docs narrate the project's history; say what is, and give a measured number its date,"
        " machine and command (git log keeps the history):\n" + "\n".join(found)
    )
