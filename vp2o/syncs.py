"""Counting the ops that make the host wait for the device (a check for code on the hot path).

Ops with a data-dependent output shape (``nonzero``, ``masked_select``, boolean indexing,
``unique``) or a scalar read (``item``, ``bool(tensor)``) wait for the GPU to finish. The
profiler records them on any device, so a CPU run can count what a GPU run would wait for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from torch.profiler import profile

SYNC_OPS = frozenset({
    "aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense", "aten::item",
    "aten::unique", "aten::_unique2",
})


def host_sync_ops(fn: Callable[[], object]) -> dict[str, int]:
    """Run ``fn()`` under the profiler; the count of each host-synchronising op it ran."""
    with profile() as prof:
        fn()
    return dict(Counter(e.name for e in prof.events() if e.name in SYNC_OPS))
