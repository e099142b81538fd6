"""What the command-line front ends share (``vp2o``, ``vp2o convert``, the benchmark scripts).

A leaf module: it imports nothing from vp2o, so ``vp2o.cli`` and ``vp2o.convert.cli`` both use it
without importing each other.
"""

from __future__ import annotations

import warnings


def quiet_third_party_warnings() -> None:
    """megatron-core warns at import about optional apex/TE and deprecated torch collectives;
    none of it is actionable for a vp2o user, so the command line hides it (the library does
    not)."""
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    warnings.filterwarnings("ignore", message=r".*\.grad attribute of a Tensor that is not a leaf")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit\..*")
