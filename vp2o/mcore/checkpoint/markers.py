"""Which checkpoints are complete, which is the latest, whose they are, and which to delete.

A checkpoint is complete when its directory is named ``step_{step:08d}`` and holds a parseable
``complete.json`` naming that step: :func:`write_marker` writes it last, into the temporary
directory, and :func:`move_into_place` then renames the directory into place, so a process
killed at any point leaves no directory that would be taken for a checkpoint. The marker also
records which loop wrote the checkpoint (``kind``: ``"sft"``, ``"train"``), so that pruning
(``keep_last``) deletes only that loop's checkpoints; a directory is renamed to ``.del_step_...``
before it is deleted. Leftover ``.tmp_*``/``.del_*``/``.old_*`` directories of saves and prunes
that did not finish are removed (or, for a replaced checkpoint, put back) by the next save; a
replaced checkpoint is also put back before a resume looks for the latest one
(:func:`recover_replaced`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vp2o.files import fsync_dir, write_text_atomic
from vp2o.mcore.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of this directory layout, stored in ``complete.json``."""
MARKER = "complete.json"
"""Name of the completion marker, written last."""
TRAINER_STATE = "trainer_state.pt"
"""Scheduler state and ``extra``, written by rank 0."""

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_LEFTOVER = re.compile(r"^\.(tmp|del|old)_step_\d{8}")


def step_dir(root: Path, step: int) -> Path:
    """``root/step_{step:08d}``: where :func:`save_checkpoint` puts ``step``."""
    return Path(root) / f"step_{step:08d}"


def read_marker(path: Path) -> dict[str, Any]:
    """The parsed ``complete.json`` of checkpoint ``path``.

    Raises:
        CheckpointError: ``path`` is not a directory, or its marker is missing, unparseable, or
            names another step than the directory does.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a directory)")
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it has no {MARKER} (a save that did not finish?); "
            f"use latest_checkpoint() to find the newest complete one"
        )
    try:
        info = json.loads(marker.read_text())
        step = int(info["step"])
        int(info["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER}: {e}") from None
    m = _STEP_DIR.match(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"checkpoint {path}: {MARKER} names step {step}, not {m.group(1)}")
    return info


def write_marker(
    directory: Path, *, step: int, world_size: int, layout: dict[str, Any], kind: Any
) -> None:
    """Write ``directory/complete.json`` (via a temporary file, fsynced, with the directory):
    the format, the step, the world size and parallel layout that saved it, ``kind`` (when a
    string) and the time."""
    marker = {
        "format": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "layout": layout,
        "kind": kind if isinstance(kind, str) else None,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "unix_time": time.time(),
    }
    write_text_atomic(directory / MARKER, json.dumps(marker, indent=1) + "\n")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest step first (temporary and incomplete ignored)."""
    return [path for path, _ in _complete_with_markers(root)]


def _complete_with_markers(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``complete_checkpoints`` with each one's parsed marker (read once)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if not m or not entry.is_dir():
            continue
        try:
            info = read_marker(entry)
        except CheckpointError:
            continue
        found.append((int(m.group(1)), entry, info))
    return [(p, info) for _, p, info in sorted(found, key=lambda x: x[0])]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (marker present and parseable), or None.
    It only reads; a resume calls :func:`recover_replaced` first (one rank, before the others
    look)."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def checkpoint_kind(path: Path, marker: dict[str, Any] | None = None) -> str | None:
    """Which loop wrote complete checkpoint ``path``: ``extra["kind"]`` (``"sft"``, ``"train"``),
    recorded in its ``complete.json``; for checkpoints written before the marker carried it, read
    from the trainer state (a ``data_position`` there means ``vp2o train``). None if unknown.

    ``marker``: its parsed ``complete.json`` when the caller has read it already.

    Raises:
        CheckpointError: the marker or the trainer state cannot be read.
    """
    info = read_marker(path) if marker is None else marker
    if "kind" in info:
        return info["kind"]
    try:
        trainer = torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {TRAINER_STATE}: {e}") from None
    extra = trainer.get("extra") or {}
    kind = extra.get("kind")
    if kind is None and "data_position" in extra:
        kind = "train"
    return kind if isinstance(kind, str) else None


def checkpoints_of_other_kinds(root: Path, kind: str) -> list[tuple[Path, str | None]]:
    """``(path, kind)`` of the complete checkpoints under ``root`` not written by ``kind``."""
    found = [(p, checkpoint_kind(p, info)) for p, info in _complete_with_markers(root)]
    return [(p, k) for p, k in found if k != kind]


def prune(root: Path, keep_last: int, kind: Any) -> None:
    """Keep only the newest ``keep_last`` complete checkpoints under ``root``; with ``kind`` a
    string, only checkpoints of that kind count and are deleted (a checkpoint another loop wrote,
    or one whose kind cannot be read, is never pruned). A failed deletion only warns."""
    ours = [p for p, info in _complete_with_markers(root)
            if not isinstance(kind, str) or _kind_or_unreadable(p, info) == kind]
    for old in ours[:-keep_last]:
        try:
            _delete_dir(old)
        except OSError as e:
            logger.warning("could not remove old checkpoint %s: %s", old, e)


def _kind_or_unreadable(path: Path, marker: dict[str, Any]) -> str | None:
    try:
        return checkpoint_kind(path, marker)
    except CheckpointError:
        return None  # unreadable: not provably ours, so not pruned


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (same step saved again) is replaced."""
    old = None
    if final.exists():
        old = final.with_name(f".old_{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)  # put the replaced checkpoint back
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _delete_dir(path: Path) -> None:
    """Delete a checkpoint so that a crash midway never leaves a ``step_*`` directory behind."""
    doomed = path.with_name(f".del_{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def remove_leftovers(root: Path) -> None:
    """Remove temporary directories of saves and prunes that did not finish (rank 0, at save).

    A ``.old_step_*`` whose ``step_*`` is missing (killed while replacing a checkpoint of the
    same step) is a complete checkpoint: it is renamed back instead.
    """
    recover_replaced(root)
    for entry in root.iterdir():
        if _LEFTOVER.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def recover_replaced(root: Path) -> None:
    """Rename each ``.old_step_*`` whose ``step_*`` is missing back to its name: a complete
    checkpoint that a save of the same step moved aside and was killed before its replacement
    arrived. It is the newest complete one, so a resume must see it. One rank calls this (rank 0
    at save, and before a resume looks for the latest checkpoint), then the others look."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if not (entry.name.startswith(".old_") and _LEFTOVER.match(entry.name)
                and entry.is_dir()):
            continue
        original = entry.with_name(entry.name[len(".old_") :])
        if not original.exists():
            try:
                os.rename(entry, original)
            except OSError as e:  # gone or taken meanwhile: the listing decides
                logger.debug("did not put back %s: %s", entry, e)
