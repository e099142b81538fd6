"""The parameter dtypes a config names (`model.params_dtype`) and the torch dtypes they are.

A leaf module (it imports nothing from vp2o): the model build, the optimizer and the checkpoint
converter read the same table.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

__all__ = ["DTYPES", "DTYPE_NAMES"]

DTYPES: MappingProxyType[str, torch.dtype] = MappingProxyType(
    {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
)
"""`model.params_dtype` name -> torch dtype."""

DTYPE_NAMES: MappingProxyType[torch.dtype, str] = MappingProxyType(
    {dtype: name for name, dtype in DTYPES.items()}
)
"""torch dtype -> its `model.params_dtype` name (the inverse of `DTYPES`)."""
