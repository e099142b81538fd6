"""Test oracles of vp2o.algo: references and generic forms the production code does not use.

Imported by the tests of tests/algo (`from oracles import ...`; pytest puts this folder on the
path). Not shipped in vp2o: production and benchmarks must not depend on them.

- `rbf_kernel`, `median_bandwidth`, `kernel_gradient`, `svgd_rbf_direction`: plain SVGD built
  from `stein.attraction` and the repulsion's kernel-gradient form (§7), the evidence that the
  transport is a Stein variational flow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from vp2o.algo.stein import attraction

__all__ = [
    "kernel_gradient",
    "median_bandwidth",
    "rbf_kernel",
    "svgd_rbf_direction",
]


def rbf_kernel(y: Tensor, x: Tensor, *, h: float | Tensor) -> Tensor:
    """RBF kernel `K[j, i] = exp(−‖x_j − y_i‖² / h)`. y: [n_y, p], x: [n_x, p] -> [n_x, n_y]."""
    diff = x.unsqueeze(1) - y.unsqueeze(0)  # [n_x, n_y, p]
    return torch.exp(-diff.square().sum(-1) / h)


def median_bandwidth(x: Tensor) -> Tensor:
    """SVGD's median heuristic `h = med² / log n` (Liu & Wang 2016), med the median distance.

    Args:
        x: Particles, [n, p], n >= 2.

    Returns:
        h, 0-dim, floored at 1e-12.
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError("the median heuristic needs at least 2 particles")
    dist = torch.cdist(x, x)  # [n, n]
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    med = torch.quantile(dist[off], 0.5)
    return (med.square() / math.log(n)).clamp_min(1e-12)


def kernel_gradient(x: Tensor, V: Tensor, kernel: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Weighted kernel-gradient field `φ(j) = ∇_{x_j} Σ_i V_ji k(x_i, x_j)`, the `x_i` held fixed.

    The generic form of the repulsion (§7), with the particles themselves in place of `W2_j`.

    Args:
        x: Particles, [n, ...].
        V: Weights, [n, n] (row j: particle j's weights on the others).
        kernel: `kernel(y, x) -> [n_x, n_y]` with entry [j, i] = k(y_i, x_j).

    Returns:
        φ, [n, ...].
    """
    with torch.enable_grad():
        xv = x.detach().requires_grad_(True)
        objective = (V * kernel(x.detach(), xv)).sum()
        (grad,) = torch.autograd.grad(objective, xv)
    return grad


def svgd_rbf_direction(x: Tensor, grad_loss: Tensor, *, h: float | Tensor | None = None) -> Tensor:
    """One SVGD direction (descent convention) built from `attraction` and `kernel_gradient`.

    With `K` the RBF kernel, `M_co` all ones and uniform repulsion weights `v_ji = 1/Σ_l k_jl`:
    `g̃_j = Σ_i a_ji g_i + ∇_{x_j} Σ_i v_ji k(x_i, x_j)`, `g = −∇ log p`. This is SVGD's
    `−φ*(x_j) = −(1/n) Σ_i [k(x_i,x_j) ∇log p(x_i) + ∇_{x_i} k(x_i,x_j)]` with the row weight
    `1/n` replaced by `1/Σ_l k_jl` (a positive per-particle step size: same fixed points).
    Update with `x ← x − ε g̃`.

    Args:
        x: Particles, [n, p].
        grad_loss: `∇_x (−log p)` at the particles, [n, p].
        h: Bandwidth (default: `median_bandwidth(x)`).

    Returns:
        g̃, [n, p].
    """
    n = x.shape[0]
    h = median_bandwidth(x) if h is None else h
    k = rbf_kernel(x, x, h=h)  # [n, n]
    everyone = torch.ones(n, n, dtype=torch.bool, device=x.device)
    phi_att = attraction(grad_loss, k, everyone)  # [n, p]
    v = (1.0 / k.sum(-1, keepdim=True)).expand(n, n)  # [n, n]
    phi_rep = kernel_gradient(x, v, lambda y, xx: rbf_kernel(y, xx, h=h))  # [n, p]
    return phi_att + phi_rep
