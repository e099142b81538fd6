"""Processes still alive after a test: what sandbox and kill tests check for leftovers."""

from __future__ import annotations

import os
from pathlib import Path


def live_pids(marker: str) -> list[int]:
    """Pids of live (not zombie) processes, other than this one, whose command line contains
    ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids
