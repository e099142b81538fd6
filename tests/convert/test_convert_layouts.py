"""Tensor layouts (pure): megatron's interleaved QKV, SwiGLU fc1, vocabulary padding.

Each layout is checked against a plain loop written from its definition and for exact inversion.
"""

from __future__ import annotations

import pytest
import torch

from vp2o.convert.tensors import (
    LAYOUTS,
    ConvertError,
    Layout,
    LayoutGeometry,
    get_layout,
    qkv_to_hf,
    qkv_to_mcore,
    register_layout,
)

GEO = LayoutGeometry(num_heads=6, num_groups=2, head_dim=3, vocab_size=10)


def _qkv_loop(q, k, v, geo):
    """megatron rows from the definition: per group g, its H/G query heads, then k_g, then v_g."""
    h, per = geo.head_dim, geo.num_heads // geo.num_groups
    rows = []
    for g in range(geo.num_groups):
        for i in range(g * per, (g + 1) * per):  # HF query head i belongs to group i // per
            rows.append(q[i * h : (i + 1) * h])
        rows.append(k[g * h : (g + 1) * h])
        rows.append(v[g * h : (g + 1) * h])
    return torch.cat(rows)


@pytest.mark.parametrize("trailing", [(5,), ()], ids=["weight", "bias"])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_qkv_matches_loop_and_inverts(trailing, groups):
    geo = LayoutGeometry(num_heads=6, num_groups=groups, head_dim=3, vocab_size=10)
    gen = torch.Generator().manual_seed(groups)
    q = torch.randn(6 * 3, *trailing, generator=gen)
    k = torch.randn(groups * 3, *trailing, generator=gen)
    v = torch.randn(groups * 3, *trailing, generator=gen)
    qkv = qkv_to_mcore(q, k, v, geo)
    assert torch.equal(qkv, _qkv_loop(q, k, v, geo))
    back = qkv_to_hf(qkv, geo)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))
    layout = get_layout("qkv")
    assert layout.hf_shapes(tuple(qkv.shape), geo) == [tuple(t.shape) for t in (q, k, v)]


def test_glu_is_gate_then_up():
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    layout = get_layout("glu")
    fc1 = layout.to_mcore([gate, up], GEO, (8, 3))
    assert torch.equal(fc1[:4], gate) and torch.equal(fc1[4:], up)
    assert all(torch.equal(a, b) for a, b in zip(layout.to_hf(fc1, GEO), (gate, up), strict=True))
    assert layout.hf_shapes((8, 3), GEO) == [(4, 3), (4, 3)]


def test_vocab_padding_zero_rows_and_strip():
    emb = torch.randn(10, 3)
    layout = get_layout("vocab")
    padded = layout.to_mcore([emb], GEO, (12, 3))
    assert torch.equal(padded[:10], emb) and not padded[10:].any()
    (back,) = layout.to_hf(padded, GEO)
    assert torch.equal(back, emb)
    assert layout.hf_shapes((12, 3), GEO) == [(10, 3)]


def test_layout_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_layout("copy", LAYOUTS["copy"])
    with pytest.raises(ConvertError, match="unknown tensor layout 'nope'.*copy, glu, qkv, vocab"):
        get_layout("nope")
    assert isinstance(get_layout("copy"), Layout)
