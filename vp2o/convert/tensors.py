"""Tensor layouts: how one megatron-core parameter is made of Hugging Face tensors and back.

Each layout is a pair of pure functions (``to_mcore`` and its exact inverse ``to_hf``) plus the HF
shapes a megatron shape splits into, registered under a name that :class:`TensorRule` refers to.
Only rows are moved, never values: a round trip is bit-identical.

Letters: d model width, f expert (or dense) ffn width, H query heads, G query groups (KV heads),
h head dimension, V vocabulary, Vp padded vocabulary.

Layouts (megatron rows, top to bottom):

- ``copy``: identical tensor.
- ``qkv``: ``linear_qkv`` holds, per query group g, the H/G query heads of that group, then k_g,
  then v_g: rows ``[G, (H/G + 2) h]``. HF keeps ``q_proj [H h]``, ``k_proj [G h]``,
  ``v_proj [G h]``, query head i belonging to group ``i // (H/G)`` (HF's ``repeat_kv``).
  The same permutation applies to the bias (dim 0 only).
- ``glu``: ``linear_fc1`` is ``[gate; up]`` (``[2f, d]``): SwiGLU ``silu(gate x) * up x``.
- ``vocab``: embedding / output rows padded with zeros from V to Vp; HF keeps the first V.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vp2o.registry import Registry


class ConvertError(ValueError):
    """A checkpoint or config cannot be converted; the message names the tensor or field."""


def read_json_object(path: Path, *, required: tuple[str, ...] = ()) -> dict:
    """The JSON object in file ``path``, with ``required`` keys present.

    Raises:
        ConvertError: unreadable, not UTF-8, not JSON, not an object, or a key missing, naming
            the file (and the line of a JSON error).
    """
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not valid UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise ConvertError(f"{path}: missing field {key!r}")
    return obj


@dataclass(frozen=True)
class LayoutGeometry:
    """The sizes the layouts need (from the model config)."""

    num_heads: int
    """Query heads H."""
    num_groups: int
    """Query groups (KV heads) G."""
    head_dim: int
    """Head dimension h."""
    vocab_size: int
    """Unpadded vocabulary V (the HF size)."""


@dataclass(frozen=True)
class Layout:
    """One way of assembling a megatron parameter from HF tensors."""

    to_mcore: Callable[[list[torch.Tensor], LayoutGeometry, tuple[int, ...]], torch.Tensor]
    """(HF tensors in rule order, geometry, megatron shape) -> megatron tensor."""
    to_hf: Callable[[torch.Tensor, LayoutGeometry], list[torch.Tensor]]
    """megatron tensor -> HF tensors in rule order (exact inverse of ``to_mcore``)."""
    hf_shapes: Callable[[tuple[int, ...], LayoutGeometry], list[tuple[int, ...]]]
    """megatron shape -> HF shapes in rule order."""


LAYOUTS: Registry[Layout] = Registry("tensor layout", error=ConvertError)


def register_layout(name: str, layout: Layout) -> None:
    """Add a layout; duplicate names raise."""
    LAYOUTS.add(name, layout)


def get_layout(name: str) -> Layout:
    """The layout called ``name``; unknown names raise ``ConvertError`` with the choices."""
    return LAYOUTS.get(name)


# --- copy ------------------------------------------------------------------------------------


def _copy_to_mcore(ts, geo, shape):
    (t,) = ts
    return t


register_layout(
    "copy",
    Layout(
        to_mcore=_copy_to_mcore,
        to_hf=lambda t, geo: [t],
        hf_shapes=lambda shape, geo: [tuple(shape)],
    ),
)


# --- qkv (weight [rows, d] and bias [rows]) ----------------------------------------------------


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geo: LayoutGeometry):
    """Interleave HF q/k/v rows into megatron's per-group ``[q heads of g, k_g, v_g]`` rows."""
    g, h = geo.num_groups, geo.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, (geo.num_heads // g) * h, *rest)  # [G, H/G h, ...]
    k = k.reshape(g, h, *rest)  # [G, h, ...]
    v = v.reshape(g, h, *rest)  # [G, h, ...]
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # [G (H/G + 2) h, ...]


def qkv_to_hf(qkv: torch.Tensor, geo: LayoutGeometry) -> list[torch.Tensor]:
    """Inverse of :func:`qkv_to_mcore`: ``[q, k, v]`` in HF row order."""
    g, h = geo.num_groups, geo.head_dim
    per_group = geo.num_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per_group + 2) * h, *rest)  # [G, (H/G + 2) h, ...]
    q, k, v = torch.split(grouped, [per_group * h, h, h], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def _qkv_hf_shapes(shape, geo):
    rest = tuple(shape[1:])
    return [
        (geo.num_heads * geo.head_dim, *rest),
        (geo.num_groups * geo.head_dim, *rest),
        (geo.num_groups * geo.head_dim, *rest),
    ]


register_layout(
    "qkv",
    Layout(
        to_mcore=lambda ts, geo, shape: qkv_to_mcore(*ts, geo),
        to_hf=qkv_to_hf,
        hf_shapes=_qkv_hf_shapes,
    ),
)


# --- glu ---------------------------------------------------------------------------------------


def _glu_to_hf(fc1, geo):
    gate, up = torch.chunk(fc1, 2, dim=0)
    return [gate.contiguous(), up.contiguous()]


register_layout(
    "glu",
    Layout(
        to_mcore=lambda ts, geo, shape: torch.cat(ts, dim=0),  # [2f, d] = [gate; up]
        to_hf=_glu_to_hf,
        hf_shapes=lambda shape, geo: [(shape[0] // 2, *shape[1:])] * 2,
    ),
)


# --- vocab -------------------------------------------------------------------------------------


def _vocab_to_mcore(ts, geo, shape):
    (t,) = ts
    pad = shape[0] - t.shape[0]
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])], dim=0)  # [Vp, d]


register_layout(
    "vocab",
    Layout(
        to_mcore=_vocab_to_mcore,
        to_hf=lambda t, geo: [t[: geo.vocab_size].contiguous()],
        hf_shapes=lambda shape, geo: [(geo.vocab_size, *shape[1:])],
    ),
)


@dataclass(frozen=True)
class TensorRule:
    """One megatron parameter and the HF tensors it is made of."""

    mcore: str
    """megatron-core parameter name at TP = EP = PP = 1 (global layer and expert numbers)."""
    hf: tuple[str, ...]
    """HF tensor names, in the order the layout takes them."""
    layout: str
    """Name of the :data:`LAYOUTS` entry."""
