"""Geometric trust regions of VP2O: anchor prototype budget (§10) and behaviour budget (§11).

Glossary: T tokens, k top-k, E experts, d model width, B sequences, L tokens per sequence.
Leading `...` dimensions (e.g. MoE layers) are accepted by the anchor functions.

Choices, said plainly:

- `anchor_distance` never forms the `[T, k, d]` gathered prototypes: with the sign-aligned learner
  prototypes and the anchor prototypes stacked as 2E atoms, `‖b^θ_t − b^anc_t‖² = wᵀ Q w` with
  `Q` the atoms' Gram matrix (2E×2E) and `w` the token's 2k signed gates. Q is formed in float64,
  so a zero distance comes out as (numerically) zero. Cost O(E²d + T k²): no d per token.
- `behavior_stats` works in float64 and in log space: `ESS = exp(2 LSE(s) − LSE(2s) − log N)`
  with `s` the per-sample log-weights shifted by their maximum; clamped to ≤ 1. Sequences without
  response tokens are not samples. No response tokens at all gives drift 0 and ESS 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vp2o.algo.registry import Registry

__all__ = [
    "ESS_LEVELS",
    "align_signs",
    "anchor_distance",
    "anchor_distance_per_token",
    "barycenters",
    "behavior_stats",
]


def align_signs(U: Tensor, U_anc: Tensor) -> Tensor:
    """Flip each `u_j` whose `u_jᵀu^anc_j < 0` (§10). U, U_anc: [..., E, d] -> [..., E, d]."""
    dots = (U * U_anc).sum(-1, keepdim=True)  # [..., E, 1]
    return torch.where(dots < 0, -U, U)


def _renormalised(gates: Tensor) -> Tensor:
    return gates / gates.sum(-1, keepdim=True).clamp_min(1e-30)  # [..., T, k]


def barycenters(ids: Tensor, gates: Tensor, U: Tensor) -> Tensor:
    """Prototype barycenters `b_t = Σ_{j∈S_t} ĝ_tj u_j`, ĝ the gates renormalised to sum 1 (§10).

    Materialises [..., T, k, d]; meant for small inputs and as a reference.

    Args:
        ids: Selected experts, long [..., T, k].
        gates: Their gates, [..., T, k].
        U: Prototypes, [..., E, d].

    Returns:
        b, [..., T, d].
    """
    lead = ids.shape[:-2]
    u_flat = U.expand(*lead, *U.shape[-2:]).reshape(-1, *U.shape[-2:])  # [n, E, d]
    ids_flat = ids.reshape(u_flat.shape[0], *ids.shape[-2:])  # [n, T, k]
    layer = torch.arange(u_flat.shape[0], device=ids.device)[:, None, None]
    gathered = u_flat[layer, ids_flat].view(*ids.shape, U.shape[-1])  # [..., T, k, d]
    return (_renormalised(gates).unsqueeze(-1).to(U.dtype) * gathered).sum(-2)  # [..., T, d]


def anchor_distance_per_token(
    ids: Tensor,
    gates: Tensor,
    U: Tensor,
    ids_anc: Tensor,
    gates_anc: Tensor,
    U_anc: Tensor,
) -> Tensor:
    """Per-token barycenter distance `‖b^θ_t − b^anc_t‖₂` (§10), U sign-aligned with U_anc.

    Args:
        ids: Learner's top-k experts, long [..., T, k].
        gates: Learner's gates, [..., T, k].
        U: Current prototypes, [..., E, d].
        ids_anc: Logged (actor) top-k experts, long [..., T, k].
        gates_anc: Logged gates, [..., T, k].
        U_anc: Anchor prototypes, [..., E, d].

    Returns:
        Distances, [..., T], in U's dtype (float32 at least).
    """
    e = U.shape[-2]
    atoms = torch.cat([align_signs(U, U_anc), U_anc], -2).double()  # [..., 2E, d]
    gram = atoms @ atoms.mT  # [..., 2E, 2E]
    idx = torch.cat([ids, ids_anc + e], -1)  # [..., T, 2k]
    w = torch.cat([_renormalised(gates.double()), -_renormalised(gates_anc.double())], -1)
    # Gather Q[idx_a, idx_b] per token without expanding Q to the tokens' leading shape.
    gram_lead = gram.shape[:-2]
    lead = torch.broadcast_shapes(idx.shape[:-2], gram_lead)
    which = torch.arange(math.prod(gram_lead), device=idx.device).view(gram_lead)
    which = which.expand(lead)[..., None, None, None]  # [..., 1, 1, 1] index of each token's Q
    lin = which * (4 * e * e) + idx.unsqueeze(-1) * (2 * e) + idx.unsqueeze(-2)  # [..., T, 2k, 2k]
    q = gram.reshape(-1)[lin]  # [..., T, 2k, 2k]
    sq = torch.einsum("...a,...ab,...b->...", w, q, w)  # [..., T]
    out_dtype = torch.promote_types(U.dtype, torch.float32)
    return sq.clamp_min(0).sqrt().to(out_dtype)


def anchor_distance(
    ids: Tensor,
    gates: Tensor,
    U: Tensor,
    ids_anc: Tensor,
    gates_anc: Tensor,
    U_anc: Tensor,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Anchor prototype budget `D` (§10): mean over layers and tokens of `‖b^θ_t − b^anc_t‖`.

    `b^θ_t = Σ_{j∈S^θ_t} ĝ^θ_tj u_j`, `b^anc_t = Σ_{j∈S^μ_t} ĝ^μ_tj u^anc_j`, each `u_j` first
    flipped to agree in sign with `u^anc_j`. The step is accepted iff `D ≤ δ` (the caller compares).

    Args:
        ids, gates, U, ids_anc, gates_anc, U_anc: As in `anchor_distance_per_token`; a leading
            layer dimension averages over layers too.
        mask: Response tokens, bool broadcastable to [..., T]; None: all tokens.

    Returns:
        D, 0-dim tensor.
    """
    per_token = anchor_distance_per_token(ids, gates, U, ids_anc, gates_anc, U_anc)  # [..., T]
    if mask is None:
        return per_token.mean() if per_token.numel() else per_token.sum()
    m = mask.to(per_token.dtype).expand_as(per_token)
    return (per_token * m).sum() / m.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# §11 behaviour budget
# --------------------------------------------------------------------------------------------

ESS_LEVELS: Registry = Registry("ESS level")


@ESS_LEVELS.register("sequence")
def _sequence_log_weights(log_ratio: Tensor, mask: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Samples are sequences: `log w_i = λ Σ_t log ρ_it`. Returns ([B], valid [B])."""
    return lam * log_ratio.sum(-1), mask.any(-1)


@ESS_LEVELS.register("token")
def _token_log_weights(log_ratio: Tensor, mask: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Samples are response tokens: `log w_it = λ log ρ_it`. Returns ([B, L], valid [B, L])."""
    return lam * log_ratio, mask


def behavior_stats(
    logp: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    lam: float = 0.5,
    *,
    ess_level: str = "sequence",
) -> tuple[Tensor, Tensor]:
    """Behaviour-budget diagnostics (§11, eq 11): drift and tempered effective sample size.

    `log ρ_it = log π_θ − log μ`; `drift = mean_{response tokens} |log ρ_it|`;
    `w_i = exp(λ Σ_t log ρ_it)` (`ess_level="sequence"`) or `w_it = exp(λ log ρ_it)` (`"token"`);
    `ESS = (Σ w)² / (N Σ w²) ∈ (0, 1]`, N the number of samples, computed with log-sum-exp.

    Args:
        logp: log π_θ, [B, L].
        logp_old: Behaviour log-probs log μ, [B, L].
        mask: Response-token mask, [B, L].
        lam: Temper λ (`vp2o.behavior.lambda`, default 0.5).
        ess_level: `sequence` (default) or `token` (`vp2o.behavior.ess_level`).

    Returns:
        (drift, ess), 0-dim tensors in logp's dtype (float32 at least).
    """
    weights_fn = ESS_LEVELS.get(ess_level)
    out_dtype = torch.promote_types(logp.dtype, torch.float32)
    m = mask.bool()
    log_ratio = torch.where(m, logp.double() - logp_old.double(), 0.0)  # [B, L]
    drift = log_ratio.abs().sum() / m.sum().clamp_min(1)
    s, valid = weights_fn(log_ratio, m, lam)
    n = valid.sum()
    s = s.masked_fill(~valid, float("-inf"))
    s = s - s.max().clamp_min(torch.finfo(torch.float64).min).detach()  # max finite when n > 0
    log_ess = 2 * torch.logsumexp(s.flatten(), 0) - torch.logsumexp(2 * s.flatten(), 0)
    log_ess = log_ess - torch.log(n.clamp_min(1).double())
    ess = torch.where(n > 0, log_ess.exp().clamp(max=1.0), torch.ones_like(log_ess))
    return drift.detach().to(out_dtype), ess.detach().to(out_dtype)
