"""megatron-core side: a model on the meta device, and dist checkpoints written and read by parts.

The converter never materialises the megatron model. It builds the ``GPTModel`` for the target
config on the ``meta`` device (:func:`build_meta_model`: parameters have shapes, no storage), asks
it for its ``sharded_state_dict()`` (megatron decides every checkpoint key, global shape, offset
and factory, e.g. the gate/up split of SwiGLU ``linear_fc1``), and then:

- **save** (:func:`save_streaming`): ``dist_checkpointing.save`` with a sharded strategy of ours
  that writes megatron's ``torch_dist`` format (PyTorch DCP files + megatron's ``metadata.json``
  and ``common.pt``) with a lazy planner: each DCP write item is resolved only when the writer
  reaches it, by building its parameter from the HF tensors and taking the item's view of it
  (the meta tensors keep each view's size, stride and storage offset). The writer streams items
  into ``__0_{i}.distcp`` files of bounded size and drops each tensor after writing it.
- **load** (:func:`load_params`): ``dist_checkpointing.load`` of a sub-state-dict holding only the
  requested parameters (real CPU tensors), so megatron reshards from whatever layout the
  checkpoint was saved with, a few parameters at a time.

The result is an ordinary megatron dist checkpoint: ``dist_checkpointing.load`` of any model's
``sharded_state_dict()`` reads it under any TP/EP/PP layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from vp2o.config import Config, ParallelConfig
from vp2o.convert.tensors import ConvertError

CHECKPOINT_FILE_BYTES = 2 * 1024**3
"""Roll over to a new ``.distcp`` file after this many bytes."""


# --------------------------------------------------------------------------------------------
# Process group and meta model
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def single_process(seed: int = 0) -> Iterator[None]:
    """torch.distributed + megatron with world size 1 for the conversion (reuses a live one).

    An existing initialisation is reused only if it is a single process with TP = EP = PP = 1.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from vp2o.mcore import parallel

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConvertError(
                f"conversion runs in one process; torch.distributed has world size "
                f"{dist.get_world_size()} (run the converter without torchrun)"
            )
        if ps.model_parallel_is_initialized():
            sizes = (
                ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size(),
            )
            if sizes != (1, 1, 1):
                raise ConvertError(f"conversion needs TP = PP = EP = 1 here; got {sizes}")
            yield
            return
    owns_process_group = not dist.is_initialized()
    rng = torch.get_rng_state()  # megatron's seeding must not leak into the caller's stream
    # Conversion is CPU work: gloo even on a GPU machine.
    parallel.initialize(Config(parallel=ParallelConfig(backend="gloo")), seed=seed)
    try:
        yield
    finally:
        if owns_process_group:
            parallel.destroy()
        else:
            ps.destroy_model_parallel()
        torch.set_rng_state(rng)


class _MetaDevice(TorchFunctionMode):
    """Every tensor created inside goes to the ``meta`` device (explicit ``device=`` included);
    ``.cuda()``/``.cpu()``/``.to(device)`` keep meta tensors on meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = dict(kwargs or {})
        if "device" in kwargs and kwargs["device"] is not None:
            kwargs["device"] = "meta"
        if func in (torch.Tensor.cuda, torch.Tensor.cpu) and args and args[0].is_meta:
            return args[0]
        if func is torch.Tensor.to and args and args[0].is_meta:
            args = tuple(
                "meta" if isinstance(a, (str, torch.device)) else a for a in args[:2]
            ) + tuple(args[2:])
        return func(*args, **kwargs)


def conversion_config(cfg: Config) -> Config:
    """The config the converter builds: ``cfg.model`` at TP = EP = PP = 1 with the local spec.

    Checkpoint keys do not depend on the layout (megatron reshards on load), nor on the local vs
    transformer-engine spec or grouped GEMM, which megatron keeps checkpoint-compatible.
    """
    model = dataclasses.replace(cfg.model, transformer_impl="local", moe_grouped_gemm=False)
    return Config(model=model, parallel=ParallelConfig())


def build_meta_model(cfg: Config):
    """``vp2o.mcore.model.build_model`` for ``conversion_config(cfg)`` on the meta device."""
    from vp2o.mcore import model as mdl

    with torch.device("meta"), _MetaDevice():
        model = mdl.build_model(conversion_config(cfg))
    bad = [n for n, p in model.named_parameters() if not p.is_meta]
    if bad:  # pragma: no cover - guards a builder change
        raise ConvertError(f"{bad[0]}: allocated outside the meta device")
    return model


def param_shapes(model) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape."""
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def param_dtypes(model) -> dict[str, torch.dtype]:
    """Parameter name -> dtype (the local spec keeps norm weights in fp32 under bf16 params)."""
    return {n: p.dtype for n, p in model.named_parameters()}


def _root(t: torch.Tensor, by_id: dict[int, str]) -> str | None:
    while t is not None:
        if id(t) in by_id:
            return by_id[id(t)]
        t = t._base
    return None


@dataclass(frozen=True)
class Piece:
    """One checkpoint chunk of a parameter: where it sits in the checkpoint tensor ``key`` and
    which view of the parameter it is (SwiGLU ``linear_fc1`` is two pieces: gate and up)."""

    param: str
    key: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    """Shape in the checkpoint tensor's dimensions (prepended axes as 1)."""
    view: tuple[tuple[int, ...], tuple[int, ...], int]
    """(size, stride, storage offset) of the piece within the contiguous parameter."""


def checkpoint_pieces(model) -> dict[str, list[Piece]]:
    """Parameter name -> its checkpoint pieces (megatron's factories applied)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    by_id = {id(p): n for n, p in model.named_parameters()}
    sd = model.sharded_state_dict()
    apply_factories(sd)
    out: dict[str, list[Piece]] = {}
    for sh in nested_values(sd):
        if not isinstance(sh, ShardedTensor):
            continue
        name = _root(sh.data, by_id)
        if name is None:  # pragma: no cover - guards a megatron change
            raise ConvertError(f"{sh.key}: not a view of a model parameter")
        d = sh.data
        out.setdefault(name, []).append(
            Piece(
                param=name,
                key=sh.key,
                global_shape=tuple(sh.global_shape),
                global_offset=tuple(sh.global_offset),
                chunk_shape=(1,) * sh.prepend_axis_num + tuple(sh.local_shape),
                view=(tuple(d.shape), tuple(d.stride()), d.storage_offset()),
            )
        )
    missing = sorted(set(by_id.values()) - set(out))
    if missing:  # pragma: no cover - guards a megatron change
        raise ConvertError(f"{missing[0]}: not in the model's sharded_state_dict")
    return out


def checkpoint_shapes(model) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> global shape, for every tensor the model saves (factories applied)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    return {v.key: tuple(v.global_shape) for v in nested_values(sd) if isinstance(v, ShardedTensor)}


# --------------------------------------------------------------------------------------------
# Streaming save
# --------------------------------------------------------------------------------------------


def _strategy_classes():
    """Build the strategy, planner and writer classes (megatron imports deferred to use)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    class LazyPlanner(MCoreSavePlanner):
        """Resolves each tensor write item by materialising it on demand."""

        def __init__(
            self, materialize: Callable[[str, tuple[int, ...], torch.Tensor], torch.Tensor]
        ):
            super().__init__(flatten_state_dict=False)
            self._materialize = materialize

        def resolve_data(self, write_item):  # noqa: D102
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            meta = self.lookup_object(write_item.index)
            return self._materialize(write_item.index.fqn, tuple(write_item.index.offset), meta)

    class StreamingWriter(FileSystemWriter):
        """Writes items one at a time into ``__{rank}_{i}.distcp`` files of bounded size."""

        def __init__(self, path: Path, file_bytes: int):
            super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
            self._file_bytes = file_bytes

        def write_data(self, plan, planner):  # noqa: D102
            prefix = plan.storage_data.prefix
            results, count, f, name = [], 0, None, None
            try:
                for item in plan.items:
                    if f is None or f.tell() >= self._file_bytes:
                        if f is not None:
                            _fsync_close(f)
                        name = f"{prefix}{count}.distcp"
                        count += 1
                        f = open(Path(self.path) / name, "wb")  # noqa: SIM115
                    data = planner.resolve_data(item)
                    start = f.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        f.write(data.getbuffer())
                    else:
                        t = data.detach().cpu()
                        if t.untyped_storage().nbytes() != t.nbytes:
                            t = t.clone()
                        torch.save(t, f)
                        del t, data
                    length = f.tell() - start
                    results.append(
                        WriteResult(
                            index=item.index,
                            size_in_bytes=length,
                            storage_data=_StorageInfo(name, start, length),
                        )
                    )
            finally:
                if f is not None:
                    _fsync_close(f)
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(results)
            return fut

    class StreamingSaveStrategy(SaveShardedStrategy):
        """megatron ``torch_dist`` format, v1, written lazily from a parameter producer."""

        def __init__(self, params_by_id: dict[int, str], produce, file_bytes: int):
            super().__init__("torch_dist", 1)
            self._by_id = params_by_id
            self._produce = produce
            self._file_bytes = file_bytes

        @property
        def can_handle_sharded_objects(self):  # noqa: D102
            return True

        def save(self, sharded_state_dict, checkpoint_dir):  # noqa: D102
            views: dict[tuple[str, tuple[int, ...]], tuple[str, Any]] = {}
            for sh in nested_values(sharded_state_dict):
                if not isinstance(sh, ShardedTensor):
                    continue
                name = _root(sh.data, self._by_id)
                if name is None:  # pragma: no cover - guards a megatron change
                    raise ConvertError(f"{sh.key}: not a view of a model parameter")
                d = sh.data
                views[(sh.key, tuple(sh.global_offset))] = (
                    name,
                    (tuple(d.shape), tuple(d.stride()), d.storage_offset(), d.dtype),
                )
            cache: dict[str, torch.Tensor] = {}

            def materialize(fqn, offset, meta):
                name, (shape, stride, storage_offset, dtype) = views[(fqn, offset)]
                if name not in cache:
                    cache.clear()  # one parameter at a time (its items are consecutive)
                    cache[name] = self._produce(name).contiguous()
                full = cache[name]
                view = full.as_strided(shape, stride, storage_offset).reshape(meta.shape)
                if view.dtype != dtype:  # pragma: no cover - produce() casts already
                    raise ConvertError(f"{name}: dtype {view.dtype}, model has {dtype}")
                return view.contiguous()

            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
            pyt_sd = mcore_to_pyt_state_dict(sd, False)
            with _unwrap_dcp_errors():
                dcp.save(
                    pyt_sd,
                    storage_writer=StreamingWriter(Path(checkpoint_dir), self._file_bytes),
                    planner=LazyPlanner(materialize),
                )

    return StreamingSaveStrategy


@contextlib.contextmanager
def _unwrap_dcp_errors() -> Iterator[None]:
    """Re-raise the first rank's original exception instead of DCP's ``CheckpointException``
    (a ``BaseException`` whose message is a formatted traceback)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from vp2o.mcore.checkpoint import dcp_cause

    try:
        yield
    except CheckpointException as e:
        cause = dcp_cause(e)
        if cause is not e:
            raise cause from None
        raise


def _fsync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def save_streaming(
    model,
    produce: Callable[[str], torch.Tensor],
    checkpoint_dir: str | os.PathLike,
    *,
    file_bytes: int = CHECKPOINT_FILE_BYTES,
) -> None:
    """Write ``model``'s dist checkpoint, building each parameter with ``produce(name)`` on demand.

    Args:
        model: the meta-device ``GPTModel`` (:func:`build_meta_model`).
        produce: parameter name -> CPU tensor of that parameter's shape and dtype.
        checkpoint_dir: an existing, empty directory.
        file_bytes: start a new ``.distcp`` file after this many bytes.
    """
    from megatron.core import dist_checkpointing

    strategy = _strategy_classes()(
        {id(p): n for n, p in model.named_parameters()}, produce, file_bytes
    )
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(checkpoint_dir), strategy)


# --------------------------------------------------------------------------------------------
# Reading parameters back
# --------------------------------------------------------------------------------------------


def read_checkpoint_shapes(checkpoint_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> global shape, from the DCP metadata (reads no tensor)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file() or not (path / "metadata.json").is_file():
        raise ConvertError(
            f"{path}: not a megatron dist checkpoint (.metadata and metadata.json expected)"
        )
    md = FileSystemReader(str(path)).read_metadata()
    return {
        k: tuple(v.size)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def check_checkpoint(model, checkpoint_dir: str | os.PathLike) -> None:
    """Every tensor ``model`` needs is in the checkpoint with its global shape, and the checkpoint
    holds no other model tensor (keys under the model's top-level prefixes).

    Raises:
        ConvertError: naming the key.
    """
    want = checkpoint_shapes(model)
    have = read_checkpoint_shapes(checkpoint_dir)
    for key, shape in want.items():
        if key not in have:
            raise ConvertError(f"{key}: missing from the checkpoint in {checkpoint_dir}")
        if have[key] != shape:
            raise ConvertError(
                f"{key}: checkpoint shape {list(have[key])}, the config implies {list(shape)}"
            )
    prefixes = {k.split(".", 1)[0] + "." for k in want}
    for key in sorted(have):
        if key not in want and any(key.startswith(p) for p in prefixes):
            raise ConvertError(f"{key}: in the checkpoint but not in the model the config builds")


def load_params(
    pieces: dict[str, list[Piece]],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    names: list[str],
    checkpoint_dir: str | os.PathLike,
) -> dict[str, torch.Tensor]:
    """Read the parameters ``names`` (full tensors, TP = EP = PP = 1 names) from a checkpoint.

    Each piece is requested as a plain chunk of its checkpoint tensor, so megatron/DCP read just
    the overlapping stored chunks, whatever layout the checkpoint was saved with.

    Args:
        pieces: :func:`checkpoint_pieces` of the meta model.
        shapes: parameter shapes.
        dtypes: parameter dtypes (stored tensors of another dtype are cast).
        names: parameters to read.
        checkpoint_dir: the dist checkpoint.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request: dict[str, Any] = {}
    fill: list[tuple[str, torch.Tensor]] = []
    out: dict[str, torch.Tensor] = {}
    for name in names:
        dtype = dtypes[name]
        full = torch.empty(shapes[name], dtype=dtype)
        out[name] = full
        for i, pc in enumerate(pieces[name]):
            view = full.as_strided(*pc.view)
            buf = (
                view.view(pc.chunk_shape)
                if view.is_contiguous()
                else torch.empty(pc.chunk_shape, dtype=dtype)
            )
            request[f"{name}#{i}"] = ShardedTensor(
                key=pc.key,
                data=buf,
                dtype=dtype,
                local_shape=pc.chunk_shape,
                global_shape=pc.global_shape,
                global_offset=pc.global_offset,
                axis_fragmentations=None,
            )
            fill.append((f"{name}#{i}", view))
    with _unwrap_dcp_errors():
        loaded = dist_checkpointing.load(
            request, str(checkpoint_dir), validate_access_integrity=False
        )
    for key, view in fill:
        got = loaded[key]
        if got.data_ptr() != view.data_ptr() or not view.is_contiguous():
            view.copy_(got.reshape(view.shape))
    return out


def load_model_weights(model, checkpoint_dir: str | os.PathLike) -> None:
    """Load a converted (or any vp2o) dist checkpoint into a live ``GPTModel``, any layout.

    Call after ``vp2o.mcore.parallel.initialize`` and ``build_model`` on every rank.

    Raises:
        CheckpointError: the checkpoint does not fit the model (naming the tensor and both
            shapes) or its files cannot be read.
    """
    from megatron.core import dist_checkpointing

    from vp2o.mcore.checkpoint import check_fits, reading_tensors

    sharded = model.sharded_state_dict()
    check_fits(sharded, Path(checkpoint_dir))  # names the checkpoint, the tensor, both shapes
    with reading_tensors(Path(checkpoint_dir)):
        state = dist_checkpointing.load({"model": sharded}, str(checkpoint_dir))
    model.load_state_dict(state["model"], strict=True)
