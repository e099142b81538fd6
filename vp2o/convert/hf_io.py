"""Hugging Face safetensors checkpoints, read and written one tensor at a time.

:class:`HFReader` parses the shard headers and reads a tensor only when asked, with positioned
reads into a fresh tensor (no memory mapping, so RSS reflects the tensors in flight).
:class:`SafetensorsShardWriter` writes shards whose headers are computed up front from the
planned names, shapes and dtypes, then streams each tensor's bytes as it arrives, so no shard is
ever assembled in memory. Shards follow the HF naming (``model-00001-of-00003.safetensors``) with
``model.safetensors.index.json``.

safetensors format: 8-byte little-endian header length N, N bytes of JSON header
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, padded with spaces
to a multiple of 8), then the tensors' raw little-endian bytes back to back.
"""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from vp2o.convert.tensors import ConvertError, read_json_object

INDEX_NAME = "model.safetensors.index.json"

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def dtype_from_code(code: str) -> torch.dtype:
    """torch dtype of a safetensors dtype code (``"BF16"``)."""
    try:
        return _CODE_DTYPES[code]
    except KeyError:
        raise ConvertError(f"unsupported safetensors dtype {code!r}") from None


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the tensor's data in its file."""
    nbytes: int


def read_header(path: Path) -> dict[str, _Entry]:
    """Tensor entries of one safetensors file (reads only the header)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConvertError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ConvertError(f"{path}: not a safetensors file (header length {n} > file size)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConvertError(f"{path}: malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: malformed safetensors header: not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtype_from_code(info["dtype"])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except ConvertError as e:  # an unsupported dtype
            raise ConvertError(f"{path}: tensor {name!r}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{path}: tensor {name!r}: malformed safetensors header entry "
                               f"(expected dtype, shape and 2 data_offsets; {e!r})") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * torch.empty((), dtype=dtype).element_size() or 8 + n + end > size:
            raise ConvertError(f"{name}: inconsistent safetensors header in {path.name}")
        entries[name] = _Entry(path.name, dtype, shape, 8 + n + begin, end - begin)
    return entries


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory, one tensor per read.

    Only the headers are parsed up front. :meth:`get` reads a tensor's bytes with positioned reads
    straight into a fresh tensor: no file is memory-mapped, so the process's RSS holds the tensors
    being converted, not the pages of every shard it has touched (which mmap would count).
    """

    def __init__(self, hf_dir: str | os.PathLike) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            weight_map = read_json_object(index, required=("weight_map",))["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise ConvertError(f"{index}: 'weight_map' must map tensor names to file names")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                other = sorted(p.name for p in self.dir.glob("*.bin"))
                hint = f" (found {other[0]}: re-save with safe_serialization=True)" if other else ""
                raise ConvertError(f"{self.dir}: no *.safetensors files{hint}")
            weight_map = None
        self._entries: dict[str, _Entry] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise ConvertError(f"{INDEX_NAME} names {name}, which does not exist in {self.dir}")
            for key, entry in read_header(path).items():
                if key in self._entries:
                    raise ConvertError(
                        f"{key}: stored twice ({self._entries[key].file} and {name})"
                    )
                self._entries[key] = entry
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self._entries or self._entries[key].file != name:
                    raise ConvertError(f"{key}: {INDEX_NAME} says {name}, not found there")
        self._files: dict[str, io.FileIO] = {}

    def names(self) -> set[str]:
        """All tensor names."""
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` without reading it."""
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """dtype of ``name`` without reading it."""
        return self._entry(name).dtype

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ConvertError(f"{name}: missing from the HF checkpoint in {self.dir}") from None

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a new CPU tensor owning its memory)."""
        e = self._entry(name)
        f = self._files.get(e.file)
        if f is None:
            f = self._files[e.file] = io.FileIO(self.dir / e.file, "rb")
        out = torch.empty(e.shape, dtype=e.dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        f.seek(e.start)
        done = 0
        while done < e.nbytes:
            n = f.readinto(buf[done:])
            if not n:
                raise ConvertError(f"{name}: {e.file} is truncated")
            done += n
        return out

    def close(self) -> None:
        """Close every open shard."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> HFReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the writer expects, in write order."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsShardWriter:
    """Write planned tensors, in order, into safetensors shards of at most ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own. Call :meth:`write` once per planned
    tensor in plan order, then :meth:`finish`.
    """

    def __init__(
        self, out_dir: str | os.PathLike, plan: list[PlannedTensor], max_shard_bytes: int
    ) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes = {max_shard_bytes}: expected >= 1")
        names = [p.name for p in plan]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConvertError(f"{dup}: planned twice")
        self.dir = Path(out_dir)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for p in plan:
            if shards[-1] and size + p.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        n = len(shards)
        self._shards = [
            (f"model-{i + 1:05d}-of-{n:05d}.safetensors", tensors)
            for i, tensors in enumerate(shards)
        ]
        self._order = [(s, i) for s, (_, ts) in enumerate(self._shards) for i in range(len(ts))]
        self._pos = 0
        self._file = None
        self._end = 0
        self.total_bytes = sum(p.nbytes for p in plan)

    def _open(self, shard: int) -> None:
        name, tensors = self._shards[shard]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for p in tensors:
            header[p.name] = {
                "dtype": _DTYPE_CODES[p.dtype],
                "shape": list(p.shape),
                "data_offsets": [offset, offset + p.nbytes],
            }
            offset += p.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.dir / name, "wb")  # noqa: SIM115 (closed in _close)
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._end = 8 + len(blob) + offset

    def _close(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        if f.tell() != self._end:
            f.close()
            raise ConvertError(f"{f.name}: wrote {f.tell()} bytes, expected {self._end}")
        f.flush()
        os.fsync(f.fileno())
        f.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (checked against the plan: name, shape, dtype)."""
        if self._pos >= len(self._order):
            raise ConvertError(f"{name}: not planned (all planned tensors are written)")
        shard, i = self._order[self._pos]
        p = self._shards[shard][1][i]
        if name != p.name:
            raise ConvertError(f"{name}: written out of order; expected {p.name}")
        if tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype:
            raise ConvertError(
                f"{name}: shape {list(tensor.shape)} {tensor.dtype}, "
                f"planned {list(p.shape)} {p.dtype}"
            )
        if i == 0:
            self._close()
            self._open(shard)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._pos += 1

    def finish(self) -> Path:
        """Close the last shard and write ``model.safetensors.index.json``; returns its path."""
        if self._pos != len(self._order):
            shard, i = self._order[self._pos]
            raise ConvertError(f"{self._shards[shard][1][i].name}: planned but never written")
        self._close()
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {p.name: file for file, ts in self._shards for p in ts},
        }
        path = self.dir / INDEX_NAME
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path

    def abort(self) -> None:
        """Close an open shard without checks (on error; the caller removes the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None
