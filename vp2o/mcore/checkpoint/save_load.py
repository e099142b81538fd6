"""Training checkpoints (model, optimizer, scheduler, RNG, trainer state), written atomically.

    path = save_checkpoint(run_dir / "checkpoints", step, model=ddp, optimizer=opt,
                           scheduler=sched, extra={"step": step, ...}, keep_last=2)
    ...
    path = latest_checkpoint(run_dir / "checkpoints")          # None: start fresh
    extra = load_checkpoint(path, model=ddp, optimizer=opt, scheduler=sched)

One checkpoint is one directory ``root/step_{step:08d}``::

    metadata.json, common.pt, __*_*.distcp    megatron dist_checkpointing (torch_dist): the
                                              model's and the optimizer's sharded_state_dict
    trainer_state.pt                          scheduler state_dict and ``extra`` (rank 0)
    rng/rank_{rank:05d}.pt                    this rank's RNG states (torch CPU and CUDA, the
                                              megatron model-parallel tracker, python, numpy)
    complete.json                             the marker, written last (step, world size,
                                              layout, time)

The directory is also a plain megatron dist checkpoint: ``dist_checkpointing.load({"model":
model.sharded_state_dict()}, path)`` (``vp2o.convert.load_model_weights``) reads the weights.

**Atomicity.** Everything is written into ``root/.tmp_step_{step:08d}``; after every rank has
finished (barrier), rank 0 writes ``complete.json`` (via a temporary file, fsynced) and renames the
directory to ``step_{step:08d}``. :func:`latest_checkpoint` only takes directories named
``step_NNNNNNNN`` whose marker parses and names that step, so a process killed at any point leaves
the previous checkpoints as they were and never a directory that would be taken for a checkpoint.
Pruning (``keep_last``) renames a directory to ``.del_step_...`` before deleting it. Leftover
``.tmp_*``/``.del_*``/``.old_*`` directories are removed by the next save.

**Failures.** Every rank's outcome of every phase is exchanged (``all_gather_object``), so a
failure on one rank (disk full, unwritable directory) raises :class:`CheckpointError` on all ranks
instead of leaving the others waiting in a barrier; the error names the path and the cause. The
temporary directory is removed; existing checkpoints are not touched.

**Resharding.** Optimizer state uses megatron's ``fully_reshardable`` format of the distributed
optimizer (``chained_optim_avoid_prefix``: no per-sub-optimizer prefixes), so a checkpoint saved
under one TP/EP/DP layout loads under another, with or without the distributed optimizer, given
the same optimizer nesting (``build_model`` marks experts ``allreduce=False`` at every EP size).

**RNG.** Restored per rank when the world size and the parallel layout equal the saved ones.
Otherwise the states cannot be mapped to ranks; every generator is reseeded deterministically
from the step (or ``seed``) and a warning says so: runs stay reproducible, but differ from the
uninterrupted run.

**megatron-core 0.16.1 workarounds.** With torch's own Adam/SGD (no transformer-engine or apex),
megatron's optimizers need their per-parameter state to exist before a save or load (created as
torch's first step would, :func:`_materialise_optimizer_state`), and, around our load call only
(:func:`_torch_optimizer_load_fixes`): the ``fully_reshardable`` load of the distributed optimizer
raises ``KeyError: 'step'``, then shares one ``step`` tensor among all parameters, and SGD has no
``init_state_fn``. Each is named there with megatron's file and line.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of this directory layout, stored in ``complete.json``."""
MARKER = "complete.json"
"""Name of the completion marker, written last."""
TRAINER_STATE = "trainer_state.pt"
"""Scheduler state and ``extra``, written by rank 0."""
RNG_DIR = "rng"
"""One file of RNG states per global rank."""
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}
"""``metadata`` for megatron's ``sharded_state_dict`` calls (resharding across layouts)."""

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_LEFTOVER = re.compile(r"^\.(tmp|del|old)_step_\d{8}")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found, or loaded into this model."""


# --------------------------------------------------------------------------------------------
# Names and the marker
# --------------------------------------------------------------------------------------------


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
    """The newest complete checkpoint under ``root`` (marker present and parseable), or None."""
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


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    extra: dict,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``root/step_{step:08d}`` atomically. Collective: call on every rank.

    Args:
        root: directory holding the checkpoints (created if missing).
        step: step number (the directory name; an existing checkpoint of that step is replaced).
        model: the ``GPTModel``, or megatron's ``DistributedDataParallel`` around it.
        optimizer: megatron's optimizer (``vp2o.mcore.training.build_optimizer``).
        scheduler: ``OptimizerParamScheduler`` (or anything with ``state_dict``), or None.
        extra: replicated trainer state (identical on every rank; rank 0's copy is written):
            tensors, numbers, strings, None, and lists/tuples/dicts of those, e.g. the step
            counter, the data position, ``SteinTransform.state_dict()``, ``to_dict(cfg)``.
        keep_last: afterwards keep only the newest ``keep_last`` complete checkpoints
            (None: keep all); with ``extra["kind"]`` set, only checkpoints of that kind count and
            are deleted (a checkpoint another loop wrote is never pruned).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: on every rank, when any rank could not write (naming the path and the
            cause); the temporary directory is removed and existing checkpoints are untouched.
        TypeError: ``extra`` holds an object that cannot be stored (naming its key).
    """
    from megatron.core.utils import unwrap_model
    from torch.distributed.checkpoint import CheckpointException  # a BaseException

    _require_distributed()
    if step < 0:
        raise ValueError(f"step = {step}: expected >= 0")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last = {keep_last}: expected >= 1 or None")
    _check_storable(extra, "extra")
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = _capture_rng()  # before anything below could draw

    # 1. Rank 0 prepares an empty temporary directory.
    failure = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            tmp.mkdir()
            _check_writable(tmp)
        except OSError as e:
            failure = e
    _agree(failure, "prepare", tmp, final, cleanup=None)

    try:
        # 2. Model and optimizer through megatron dist_checkpointing (collective).
        failure = None
        try:
            gpt = unwrap_model(model)
            _materialise_optimizer_state(optimizer)
            msd = gpt.sharded_state_dict(metadata=SHARDING_METADATA)
            osd = optimizer.sharded_state_dict(msd, is_loading=False, metadata=SHARDING_METADATA)
            _dist_save({"model": msd, "optimizer": osd}, tmp)
        except (Exception, CheckpointException) as e:  # reported on every rank by _agree
            failure = e
        _agree(failure, "write model and optimizer", tmp, final, cleanup=tmp)

        # 3. Per-rank RNG states; rank 0: scheduler and extra.
        failure = None
        try:
            (tmp / RNG_DIR).mkdir(exist_ok=True)
            _write_torch(rng, tmp / RNG_DIR / f"rank_{rank:05d}.pt")
            if rank == 0:
                state = {
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "extra": extra,
                }
                _write_torch(state, tmp / TRAINER_STATE)
        except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
            failure = e
        _agree(failure, "write trainer state", tmp, final, cleanup=tmp)

        # 4. Rank 0: the marker, last, then the rename into place.
        failure = None
        if rank == 0:
            try:
                marker = {
                    "format": FORMAT_VERSION,
                    "step": step,
                    "world_size": world,
                    "layout": _layout(unwrap_model(model), optimizer, world),
                    "kind": extra.get("kind") if isinstance(extra.get("kind"), str) else None,
                    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "unix_time": time.time(),
                }
                _write_text(json.dumps(marker, indent=1) + "\n", tmp / MARKER)
                _fsync_dir(tmp)
                _move_into_place(tmp, final)
            except Exception as e:  # noqa: BLE001 - reported on every rank by _agree
                failure = e
        _agree(failure, "finalise", tmp, final, cleanup=tmp)
    except CheckpointError:
        raise
    except BaseException:
        # Anything else (KeyboardInterrupt, a collective error): do not leave a partial directory.
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    # 5. Prune (rank 0). A failure here only warns: the new checkpoint is complete.
    if keep_last is not None and rank == 0:
        kind = extra.get("kind")
        ours = [p for p, info in _complete_with_markers(root)
                if not isinstance(kind, str) or _kind_or_unreadable(p, info) == kind]
        for old in ours[:-keep_last]:
            try:
                _delete_dir(old)
            except OSError as e:
                logger.warning("could not remove old checkpoint %s: %s", old, e)
    dist.barrier()
    return final


def _kind_or_unreadable(path: Path, marker: dict[str, Any]) -> str | None:
    try:
        return checkpoint_kind(path, marker)
    except CheckpointError:
        return None  # unreadable: not provably ours, so not pruned


def _dist_save(sharded_state_dict: dict, directory: Path) -> None:
    """megatron's ``dist_checkpointing.save`` (a module-level name: tests inject faults here)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, str(directory))


def _agree(
    failure: BaseException | None,
    phase: str,
    tmp: Path,
    final: Path,
    *,
    cleanup: Path | None,
) -> None:
    """Exchange every rank's outcome of ``phase``; on any failure clean up, raise on all ranks."""
    os_error = _find_os_error(failure)
    mine = None
    if failure is not None:
        text = _describe(failure, os_error)
        code = os_error.errno if os_error is not None else None
        if code is None:  # torch DCP pickles worker errors across ranks: only the text survives
            found = re.search(r"\[Errno (\d+)\]", text)
            code = int(found.group(1)) if found else None
        if code is None and "unexpected pos" in text:
            # torch's zip writer (inline_container.cc) reports a short write this way: on a full
            # file system the ENOSPC itself is swallowed by its stream.
            code = errno.ENOSPC
            text += " (a short write: No space left on device, most likely)"
        mine = (text, code)
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    failed = [(r, out) for r, out in enumerate(outcomes) if out is not None]
    if not failed:
        return
    if cleanup is not None and dist.get_rank() == 0:
        shutil.rmtree(cleanup, ignore_errors=True)
    where = "; ".join(f"rank {r}: {msg}" for r, (msg, _) in failed)
    codes = {code for _, (_, code) in failed}
    raise CheckpointError(
        f"could not save checkpoint {final} ({phase}, temporary directory {tmp}): {where}."
        f"{_hint(codes)}{_free_space(final.parent)} Existing checkpoints in {final.parent} were "
        "not touched."
    ) from failure


def _describe(e: BaseException, os_error: OSError | None) -> str:
    if os_error is not None:
        name = f": {os_error.filename}" if os_error.filename else ""
        return f"{os.strerror(os_error.errno)} ({errno.errorcode.get(os_error.errno, '?')}){name}"
    e = dcp_cause(e)
    return f"{type(e).__name__}: {str(e).strip()}"


def dcp_cause(e: BaseException) -> BaseException:
    """The first rank's original exception inside torch DCP's ``CheckpointException`` (whose own
    message is a formatted traceback), else ``e``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for inner in failures.values():
            inner = inner[0] if isinstance(inner, tuple) and inner else inner
            if isinstance(inner, BaseException):
                return inner
    return e


def _hint(codes: set) -> str:
    if codes & {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}:
        return " The file system is full (or a size limit was hit): free space or save elsewhere."
    if codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
        return " The directory is not writable: fix its permissions or save elsewhere."
    return ""


def _free_space(root: Path) -> str:
    for path in (root, *root.parents):
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            continue
        return f" {free / 2**20:.1f} MiB are free on the file system of {path}."
    return ""


def _find_os_error(e: BaseException | None, depth: int = 0) -> OSError | None:
    """The OSError behind ``e``: itself, its cause/context, or inside torch DCP's failures."""
    if e is None or depth > 8:
        return None
    if isinstance(e, OSError) and e.errno is not None:
        return e
    for inner in getattr(e, "failures", {}).values():  # torch.distributed.checkpoint
        if isinstance(inner, tuple) and inner:  # (exception, traceback summary)
            inner = inner[0]
        found = _find_os_error(inner if isinstance(inner, BaseException) else None, depth + 1)
        if found is not None:
            return found
    return _find_os_error(e.__cause__ or e.__context__, depth + 1)


def _check_writable(directory: Path) -> None:
    """Raise the OSError a write into ``directory`` gets (permissions, read-only, full disk)."""
    probe = directory / ".probe"
    with open(probe, "wb") as f:
        f.write(b"0")
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()


def _write_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(text: str, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / file system
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, final: Path) -> None:
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
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _delete_dir(path: Path) -> None:
    """Delete a checkpoint so that a crash midway never leaves a ``step_*`` directory behind."""
    doomed = path.with_name(f".del_{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _remove_leftovers(root: Path) -> None:
    """Remove temporary directories of saves and prunes that did not finish (rank 0, at save).

    A ``.old_step_*`` whose ``step_*`` is missing (killed while replacing a checkpoint of the
    same step) is a complete checkpoint: it is renamed back instead.
    """
    for entry in root.iterdir():
        if not (_LEFTOVER.match(entry.name) and entry.is_dir()):
            continue
        if entry.name.startswith(".old_"):
            original = entry.with_name(entry.name[len(".old_") :])
            if not original.exists():
                os.rename(entry, original)
                continue
        shutil.rmtree(entry, ignore_errors=True)


_STORABLE_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype)


def _check_storable(obj: Any, where: str) -> None:
    """Reject what ``torch.load(weights_only=True)`` could not read back, naming the key."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; use str or int keys")
            _check_storable(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_storable(v, f"{where}[{i}]")
    elif not isinstance(obj, _STORABLE_LEAVES):
        raise TypeError(
            f"{where} is a {type(obj).__name__}: a checkpoint's extra may hold tensors, numbers, "
            "strings, None, and lists/tuples/dicts of those (e.g. vp2o.config.to_dict(cfg))"
        )


def _layout(gpt, optimizer, world: int) -> dict[str, Any]:
    c = gpt.config
    model_parallel = (
        c.tensor_model_parallel_size * c.pipeline_model_parallel_size * c.context_parallel_size
    )
    return {
        "tensor_parallel": c.tensor_model_parallel_size,
        "pipeline_parallel": c.pipeline_model_parallel_size,
        "context_parallel": c.context_parallel_size,
        "expert_parallel": c.expert_model_parallel_size,
        "expert_tensor_parallel": c.expert_tensor_parallel_size,
        "data_parallel": world // model_parallel,
        "distributed_optimizer": _uses_distributed_optimizer(optimizer),
    }


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _sub_optimizers(optimizer))


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _require_distributed() -> None:
    if not dist.is_initialized():
        raise CheckpointError(
            "checkpoints are collective: call vp2o.mcore.parallel.initialize(cfg) first"
        )


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def _capture_rng() -> dict[str, Any]:
    """This rank's RNG states, in a form ``torch.load(weights_only=True)`` reads back."""
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": {
            name: state.clone()
            for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()
        },
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }


def _restore_rng(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.set_states({name: s.clone() for name, s in state["tracker"].items()})
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _reseed(seed: int) -> None:
    """Every generator seeded from ``seed`` as ``parallel.initialize`` does (model-parallel
    tracker states offset per TP/EP rank by megatron)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def load_checkpoint(
    path: Path,
    *,
    model,
    optimizer,
    scheduler,
    seed: int | None = None,
) -> dict:
    """Load checkpoint ``path`` into this rank's model, optimizer and scheduler. Collective.

    The checkpoint may come from another parallel layout (TP/EP/DP, with or without the
    distributed optimizer): megatron reshards it. RNG states are restored when the world size
    and layout equal the saved ones; otherwise every generator is reseeded from ``seed`` (default:
    derived from the step) and a warning is issued.

    Args:
        path: a checkpoint directory (e.g. from :func:`latest_checkpoint`).
        model: the ``GPTModel`` or megatron's ``DistributedDataParallel`` around it.
        optimizer: megatron's optimizer, or None to load the weights only.
        scheduler: ``OptimizerParamScheduler``, or None.
        seed: reseed value for the fallback above.

    Returns:
        ``extra`` as saved.

    Raises:
        CheckpointError: ``path`` is missing or incomplete, or the checkpoint does not fit the
            model (naming the tensor and both shapes).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    _require_distributed()
    path = Path(path)
    info = read_marker(path)
    gpt = unwrap_model(model)
    stored = _stored_tensors(path)
    msd = gpt.sharded_state_dict(metadata=SHARDING_METADATA)
    _check_fits(msd, stored, path, what="model")
    request: dict[str, Any] = {"model": msd}
    with _torch_optimizer_load_fixes(optimizer):
        if optimizer is not None:
            _materialise_optimizer_state(optimizer)
            request["optimizer"] = optimizer.sharded_state_dict(
                msd, is_loading=True, metadata=SHARDING_METADATA
            )
            _check_fits(request["optimizer"], stored, path, what="optimizer")
        with reading_tensors(path):
            loaded = dist_checkpointing.load(request, str(path))
        gpt.load_state_dict(loaded["model"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
    try:
        trainer = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {TRAINER_STATE}: {e}") from None
    if scheduler is not None:
        if trainer["scheduler"] is None:
            raise CheckpointError(f"checkpoint {path} was saved without a scheduler state")
        scheduler.load_state_dict(trainer["scheduler"])

    world = dist.get_world_size()
    layout = _layout(gpt, optimizer, world)
    saved_layout = dict(info.get("layout", {}))
    same = info["world_size"] == world and all(
        saved_layout.get(k) == layout[k] for k in layout if k != "distributed_optimizer"
    )
    if same:
        rng_file = path / RNG_DIR / f"rank_{dist.get_rank():05d}.pt"
        try:
            _restore_rng(torch.load(rng_file, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"checkpoint {path}: cannot read {rng_file}: {e}") from None
    else:
        base = seed if seed is not None else zlib.crc32(f"vp2o-resume-{info['step']}".encode())
        if dist.get_rank() == 0:
            warnings.warn(
                f"checkpoint {path} was saved by {info['world_size']} ranks with layout "
                f"{saved_layout}; this run has {world} ranks with {layout}: RNG states cannot be "
                f"restored per rank, reseeding every generator with {base} (deterministic, but "
                "random draws differ from the uninterrupted run)",
                stacklevel=2,
            )
        _reseed(base)
    return trainer["extra"]


def _stored_tensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor in the dist checkpoint at ``path``, by key."""
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(str(path))
    except Exception as e:  # noqa: BLE001 - megatron raises several types here
        raise CheckpointError(f"checkpoint {path}: cannot read its tensor metadata: {e}") from None
    return {key: tuple(sh.global_shape) for key, sh in meta.items()}


def check_fits(sharded: Any, path: Path, what: str = "model") -> None:
    """Raise ``CheckpointError`` unless every tensor of the sharded state dict ``sharded`` is
    in the dist checkpoint at ``path`` with the same global shape (before a load, whose own
    error would name neither the checkpoint nor both shapes)."""
    _check_fits(sharded, _stored_tensors(Path(path)), Path(path), what=what)


@contextlib.contextmanager
def reading_tensors(path: Path) -> Iterator[None]:
    """``dist_checkpointing.load`` of ``path`` with read failures (a truncated or missing
    ``.distcp`` or ``common.pt``: EOFError, FileNotFoundError, zip errors, DCP's
    ``CheckpointException``) as one ``CheckpointError`` naming the checkpoint. Run the shape
    checks first: what fails here is the files, not the model."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"checkpoint {path}: cannot read its tensors ({_describe(e, _find_os_error(e))}); "
            "its files are corrupt or incomplete (an earlier complete checkpoint, if any, is in "
            "the same folder)"
        ) from e


def _check_fits(sharded: Any, stored: dict[str, tuple[int, ...]], path: Path, what: str) -> None:
    """Every tensor ``sharded`` requests exists in the checkpoint with the same global shape."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def tensors(tree):
        for v in nested_values(tree):
            if isinstance(v, ShardedTensorFactory):
                yield from tensors(v.build())
            elif isinstance(v, ShardedTensor):
                yield v

    for sh in tensors(sharded):
        want = tuple(sh.global_shape)
        have = stored.get(sh.key)
        if have is None:
            raise CheckpointError(
                f"checkpoint {path} does not fit this {what}: it has no tensor {sh.key!r} of "
                f"shape {want} (a checkpoint of another model shape or optimizer?)"
            )
        if have != want:
            raise CheckpointError(
                f"checkpoint {path} does not fit this {what}: tensor {sh.key!r} has shape {have} "
                f"in the checkpoint, this {what} needs {want} (a checkpoint of another model "
                "shape?)"
            )


# --------------------------------------------------------------------------------------------
# megatron-core 0.16.1 workarounds, active only inside load_checkpoint
# --------------------------------------------------------------------------------------------


def _materialise_optimizer_state(optimizer) -> None:
    """Create the per-parameter state torch's Adam/AdamW/SGD would create at their first step.

    megatron's checkpoint code needs the state to exist: ``DistributedOptimizer.state_dict``
    asserts one common Adam ``step`` over it (distrib_optimizer.py:641; an optimizer that has not
    stepped yet fails with a bare ``AssertionError`` on save), and the load dict is built from it
    (distrib_optimizer.py:1268, optimizer.py:1018-1021), so state missing on one side is missing
    from the checkpoint or from the request. Missing entries are created exactly as torch's lazy
    initialisation does (Adam: ``step`` 0, zero moments; SGD with momentum: a zero momentum
    buffer, which with megatron's dampening 0 gives the same first update as torch's
    ``clone(grad)``), so the next step computes what it would have computed anyway. (megatron's
    ``_init_optimizer_states_with_dummy_values`` takes an optimizer step on zero gradients
    instead, which with decoupled weight decay changes the parameters.)
    """
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if len(state) == 0:
                        on_device = group.get("capturable") or group.get("fused")
                        state["step"] = (
                            torch.zeros((), dtype=_scalar_dtype(), device=p.device)
                            if on_device
                            else torch.tensor(0.0, dtype=_scalar_dtype())
                        )
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                        if group.get("amsgrad"):
                            state["max_exp_avg_sq"] = torch.zeros_like(
                                p, memory_format=torch.preserve_format
                            )
        elif isinstance(inner, torch.optim.SGD):
            for group in inner.param_groups:
                if group.get("momentum", 0) != 0:
                    for p in group["params"]:
                        state = inner.state[p]
                        if state.get("momentum_buffer") is None:
                            state["momentum_buffer"] = torch.zeros_like(p)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@contextlib.contextmanager
def _torch_optimizer_load_fixes(optimizer) -> Iterator[None]:
    """Make megatron's optimizers load our checkpoints with torch's own Adam and SGD.

    Covers, for this optimizer object only and only for the duration of the block (instance
    attributes, removed afterwards; nothing global is patched). The state itself is created
    beforehand by :func:`_materialise_optimizer_state`.

    1. ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` skips the ``step``
       key (distrib_optimizer.py:2101), but ``_set_main_param_and_optimizer_states`` then copies
       every key of torch Adam's per-parameter state, ``step`` included, from the loaded tensors
       (distrib_optimizer.py:936-940): ``KeyError: 'step'``. The instance method is wrapped so
       that keys absent from the loaded tensors keep their current value (``step`` was already
       set from the param groups by ``load_state_dict``, distrib_optimizer.py:817-826).
    2. ``DistributedOptimizer.load_state_dict`` gives every parameter *the same* ``step`` tensor
       (distrib_optimizer.py:818-825) and torch's ``Optimizer.load_state_dict`` keeps it shared;
       torch Adam increments each parameter's step in place, so after one update the step would
       have advanced once per parameter (wrong bias correction from then on). After the load each
       parameter gets its own copy.
    3. ``FP32Optimizer.sharded_state_dict(is_loading=True)`` calls ``self.init_state_fn``
       (optimizer.py:1018-1019), which ``get_megatron_optimizer`` leaves None for SGD
       (``TypeError``): a no-op stands in (the state already exists).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer

    patched: list[tuple[Any, str]] = []
    distributed = []
    for sub in _sub_optimizers(optimizer) if optimizer is not None else []:
        inner = getattr(sub, "optimizer", None)
        if isinstance(sub, DistributedOptimizer) and isinstance(
            inner, torch.optim.Adam | torch.optim.AdamW
        ):
            distributed.append(sub)
            sub._set_main_param_and_optimizer_states = _keep_missing_keys(sub)  # (1)
            patched.append((sub, "_set_main_param_and_optimizer_states"))
        elif isinstance(sub, FP32Optimizer) and getattr(sub, "init_state_fn", 0) is None:
            sub.init_state_fn = _no_state_init  # (3)
            patched.append((sub, "init_state_fn"))
    try:
        yield
        for sub in distributed:  # (2)
            for state in sub.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
    finally:
        for obj, name in patched:
            if name == "init_state_fn":
                obj.init_state_fn = None
            else:
                vars(obj).pop(name, None)


def _keep_missing_keys(sub):
    """``sub._set_main_param_and_optimizer_states`` that keeps state absent from ``tensors``."""
    original = type(sub)._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        current = sub._get_main_param_and_optimizer_states(model_param)
        merged = {k: tensors[k] if k in tensors else v for k, v in current.items()}
        return original(sub, model_param, merged)

    return set_states


def _no_state_init(opt, config=None) -> None:
    """Stands in for the missing ``init_state_fn`` of megatron's SGD (state already exists)."""
