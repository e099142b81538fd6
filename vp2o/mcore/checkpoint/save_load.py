"""Saving and loading a checkpoint: model, optimizer, scheduler, RNG states and trainer state.

The package docstring (``vp2o.mcore.checkpoint``) describes the directory, atomicity, failures,
resharding and RNG. Here: the collective save in phases, each phase's outcome exchanged by every
rank (:func:`_agree`), and the load with its checks before anything is read (the checkpoint's
tensors against the model's and optimizer's, by key and global shape).
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import shutil
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vp2o.mcore.checkpoint import errors, markers
from vp2o.mcore.checkpoint.errors import CheckpointError
from vp2o.mcore.checkpoint.markers import TRAINER_STATE
from vp2o.mcore.checkpoint.optimizer_fixes import (
    materialise_optimizer_state,
    torch_optimizer_load_fixes,
)
from vp2o.mcore.optim_state import megatron_parts

RNG_DIR = "rng"
"""One file of RNG states per global rank."""
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}
"""``metadata`` for megatron's ``sharded_state_dict`` calls (resharding across layouts)."""


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
    final = markers.step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = _capture_rng()  # before anything below could draw

    # 1. Rank 0 prepares an empty temporary directory.
    failure = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            markers.remove_leftovers(root)
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
            materialise_optimizer_state(optimizer)
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
                markers.write_marker(
                    tmp, step=step, world_size=world, kind=extra.get("kind"),
                    layout=_layout(unwrap_model(model), optimizer, world),
                )
                markers.move_into_place(tmp, final)
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
        markers.prune(root, keep_last, kind=extra.get("kind"))
    dist.barrier()
    return final


def _dist_save(sharded_state_dict: dict, directory: Path) -> None:
    """megatron's ``dist_checkpointing.save`` (a module-level name: tests inject faults here)."""
    from megatron.core import dist_checkpointing

    _in_process_write_results()
    dist_checkpointing.save(sharded_state_dict, str(directory))


def _in_process_write_results() -> None:
    """Give megatron's file writer an in-process queue for its write results.

    ``FileSystemWriterAsync`` makes that queue on first use from a ``spawn`` Manager: a fresh
    interpreter that imports torch (a first save's write took 2.11 s instead of 0.11 s,
    2026-12-07, 2-core VM) and stays alive as one more process per rank. Our saves are
    synchronous: the writer's function runs in this process, puts its results and
    ``retrieve_write_results`` reads them back here, so a thread-safe ``queue.Queue`` carries
    the same objects. Megatron keeps the queue in the module-level ``_results_queue`` and
    fills it only while it is None; if a later megatron drops that name, this does nothing and
    its own queue is used.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def _agree(
    failure: BaseException | None,
    phase: str,
    tmp: Path,
    final: Path,
    *,
    cleanup: Path | None,
) -> None:
    """Exchange every rank's outcome of ``phase``; on any failure clean up, raise on all ranks."""
    mine = None if failure is None else errors.rank_failure(failure)
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    failed = [(r, out) for r, out in enumerate(outcomes) if out is not None]
    if not failed:
        return
    if cleanup is not None and dist.get_rank() == 0:
        shutil.rmtree(cleanup, ignore_errors=True)
    raise errors.save_error(final, phase, tmp, failed) from failure


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

    return any(isinstance(o, DistributedOptimizer) for o in megatron_parts(optimizer))


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
    info = markers.read_marker(path)
    gpt = unwrap_model(model)
    stored = _stored_tensors(path)
    msd = gpt.sharded_state_dict(metadata=SHARDING_METADATA)
    _check_fits(msd, stored, path, what="model")
    request: dict[str, Any] = {"model": msd}
    with torch_optimizer_load_fixes(optimizer):
        if optimizer is not None:
            materialise_optimizer_state(optimizer)
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
            f"checkpoint {path}: cannot read its tensors ({errors.describe(e)}); "
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
