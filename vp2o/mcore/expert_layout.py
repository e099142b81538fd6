"""Per-expert views of a MoE layer's expert weights and gradients, whatever module holds them.

The Stein transform (``vp2o.mcore.stein_step``) reads each local expert's fc1 weight [2f, d]
(or [f, d]) and fc2 weight [d, f], and reads and writes their ``main_grad``. Three expert modules
hold them differently:

- megatron's ``SequentialMLP``: one ``linear_fc1.weight`` / ``linear_fc2.weight`` parameter per
  expert (``local_experts.{i}``);
- megatron's ``TEGroupedMLP``: parameters ``weight{i}`` of two grouped linears;
- vp2o's :class:`vp2o.mcore.grouped_experts.GroupedExperts`: one [E_loc, out, in] parameter per
  projection; expert i is row i.

:func:`local_expert_weights` returns, per projection, one handle per local expert (local order)
with ``.detach()`` (the weight, no autograd) and ``.main_grad`` (megatron's fp32 gradient view):
the parameters themselves for the first two, :class:`ExpertSlice` for the grouped weights. Both
are read when used, never cached: megatron's DDP and distributed optimizer re-point ``.data`` and
``.main_grad`` into their buffers after the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertSlice:
    """Expert ``index``'s matrix of a grouped [E_loc, out, in] expert parameter."""

    param: torch.nn.Parameter
    index: int

    def detach(self) -> torch.Tensor:
        """The weight [out, in] (a view of the parameter, no autograd)."""
        return self.param.detach()[self.index]

    @property
    def main_grad(self) -> torch.Tensor:
        """The fp32 gradient [out, in] (a view of megatron's grad buffer)."""
        return self.param.main_grad[self.index]

    @property
    def grad(self) -> torch.Tensor | None:
        """The autograd gradient [out, in], or None."""
        g = self.param.grad
        return None if g is None else g[self.index]

    @property
    def shape(self) -> torch.Size:
        """[out, in]."""
        return self.param.shape[1:]


def local_expert_weights(layer) -> tuple[list, list]:
    """(fc1 handles, fc2 handles) of this rank's experts of MoE ``layer``, local order.

    Each handle has ``.detach()`` -> [2f, d] or [f, d] (fc1), [d, f] (fc2) and ``.main_grad``.
    """
    experts = layer.experts
    if hasattr(experts, "local_experts"):  # SequentialMLP
        fc1 = [e.linear_fc1.weight for e in experts.local_experts]
        fc2 = [e.linear_fc2.weight for e in experts.local_experts]
        return fc1, fc2
    if hasattr(experts, "linear_fc1") and hasattr(experts.linear_fc1, "weight0"):  # TEGroupedMLP
        n = experts.num_local_experts
        fc1 = [getattr(experts.linear_fc1, f"weight{i}") for i in range(n)]
        fc2 = [getattr(experts.linear_fc2, f"weight{i}") for i in range(n)]
        return fc1, fc2
    if hasattr(experts, "weight1") and hasattr(experts, "weight2"):  # vp2o GroupedExperts
        n = experts.num_local_experts
        fc1 = [ExpertSlice(experts.weight1, i) for i in range(n)]
        fc2 = [ExpertSlice(experts.weight2, i) for i in range(n)]
        return fc1, fc2
    raise NotImplementedError(
        f"VP2O reads SequentialMLP, TEGroupedMLP and vp2o GroupedExperts experts, not "
        f"{type(experts).__name__} (megatron's legacy GroupedMLP): set model.moe_grouped_gemm"
        "=false or install transformer-engine"
    )


def weight(handle) -> torch.Tensor:
    """An expert's weight without autograd (a parameter's or an :class:`ExpertSlice`'s)."""
    return handle.detach()


def main_grad(handle) -> torch.Tensor:
    """An expert's ``main_grad`` (a parameter's or an :class:`ExpertSlice`'s)."""
    return handle.main_grad
