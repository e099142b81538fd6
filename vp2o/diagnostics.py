"""Routing diagnostics logged every step in both modes (method §12): what the paper lacks.

All inputs are the reduced per-step statistics (identical on every rank); outputs are tensors
(the logger does the one host sync).
"""

from __future__ import annotations

import torch


def routing_diagnostics(C: torch.Tensor, prototypes: torch.Tensor, topk: int) -> dict:
    """Expert utilisation, overlap and prototype similarity.

    Args:
        C: co-activation [L, E, E] (method §3; diag = fraction of tokens routed to each expert).
        prototypes: [L, E, d] unit prototypes (§4).
        topk: k.

    Returns:
        ``experts/load`` [L, E] (share of the routing assignments, rows sum to 1),
        ``experts/load_entropy`` (normalised entropy of the load, mean over layers; 1 = uniform),
        ``experts/load_max_over_min`` (mean over layers; inf when an expert got nothing),
        ``experts/overlap`` (mean off-diagonal of C normalised by sqrt(C_ii C_jj), over active
        pairs), ``prototypes/mean_abs_cosine`` (mean |u_i.u_j|, i != j), ``prototypes/similarity``
        [E, E] (|u_i.u_j| of the first MoE layer).
    """
    L, E, _ = C.shape
    usage = torch.diagonal(C, dim1=1, dim2=2)  # [L, E]
    load = usage / usage.sum(-1, keepdim=True).clamp_min(1e-12)  # [L, E]
    entropy = -(load * load.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(E)))
    max_over_min = load.max(-1).values / load.min(-1).values
    norm = torch.sqrt(usage.unsqueeze(-1) * usage.unsqueeze(-2))  # [L, E, E]
    active = norm > 0
    off = ~torch.eye(E, dtype=torch.bool, device=C.device)
    pairs = active & off
    overlap = (C / norm.clamp_min(1e-12))[pairs].mean() if pairs.any() else C.new_zeros(())
    sim = (prototypes @ prototypes.transpose(1, 2)).abs()  # [L, E, E]
    mean_abs_cos = sim[:, off].mean()
    return {
        "experts/load": load,
        "experts/load_entropy": entropy.mean(),
        "experts/load_max_over_min": max_over_min.mean(),
        "experts/overlap": overlap,
        "prototypes/mean_abs_cosine": mean_abs_cos,
        "prototypes/similarity": sim[0],
    }
