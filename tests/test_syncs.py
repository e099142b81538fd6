"""vp2o.syncs: the profiler-based count of host-synchronising ops."""

from __future__ import annotations

import torch

from vp2o.syncs import host_sync_ops


def test_counts_data_dependent_shapes_and_scalar_reads_and_nothing_else():
    x = torch.arange(6.0)
    mask = x > 2
    assert host_sync_ops(lambda: (x * 2 + 1).sum()) == {}
    assert host_sync_ops(lambda: torch.where(mask, x, 0.0).sum()) == {}
    assert host_sync_ops(lambda: x[mask]).get("aten::nonzero", 0) >= 1
    assert host_sync_ops(lambda: x.masked_select(mask)).get("aten::masked_select", 0) == 1
    assert host_sync_ops(lambda: float(x.sum())).get("aten::_local_scalar_dense", 0) == 1
