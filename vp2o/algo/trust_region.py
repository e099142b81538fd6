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
- Both budgets are statistics of the whole batch, and under data parallelism each rank holds a
  share of it. `anchor_distance_partials` and `behavior_partials` give a share's sufficient
  statistics (sums, counts and log-sum-exps) as one float64 vector; the `*_from_partials`
  functions combine the rows of any number of shares into exactly the whole batch's value. The
  trainer all-gathers these few numbers so every rank takes the same accept/refresh decision
  (the single-share path is the same code: `anchor_distance` and `behavior_stats` call both).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vp2o.registry import Registry

__all__ = [
    "ESS_LEVELS",
    "align_signs",
    "anchor_distance",
    "anchor_distance_from_partials",
    "anchor_distance_partials",
    "anchor_distance_per_token",
    "barycenters",
    "behavior_from_partials",
    "behavior_partials",
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
        D, 0-dim tensor (U's dtype, float32 at least); 0 when no token counts.
    """
    per_token = anchor_distance_per_token(ids, gates, U, ids_anc, gates_anc, U_anc)  # [..., T]
    parts = anchor_distance_partials(per_token, mask)
    return anchor_distance_from_partials(parts.unsqueeze(0)).to(per_token.dtype)


def anchor_distance_partials(per_token: Tensor, mask: Tensor | None = None) -> Tensor:
    """One share's sufficient statistics for `D`: float64 `[Σ distances, number of distances]`.

    Args:
        per_token: `anchor_distance_per_token` of the share, [..., T].
        mask: Response tokens, bool broadcastable to [..., T]; None: all tokens.
    """
    if mask is None:
        m = torch.ones_like(per_token, dtype=torch.float64)
    else:
        m = mask.to(torch.float64).expand_as(per_token)
    return torch.stack([(per_token.double() * m).sum(), m.sum()])  # [2]


def anchor_distance_from_partials(partials: Tensor) -> Tensor:
    """`D` of the union of the shares whose `anchor_distance_partials` are the rows of
    `partials` [R, 2]: total distance over total count (0 when nothing counts), float64."""
    total = partials.double().sum(0)
    return total[0] / total[1].clamp_min(1)


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
        lam: Temper λ (`vp2o.behavior.lam`, default 0.5).
        ess_level: `sequence` (default) or `token` (`vp2o.behavior.ess_level`).

    Returns:
        (drift, ess), 0-dim tensors in logp's dtype (float32 at least).
    """
    out_dtype = torch.promote_types(logp.dtype, torch.float32)
    parts = behavior_partials(logp, logp_old, mask, lam, ess_level=ess_level)
    drift, ess = behavior_from_partials(parts.unsqueeze(0))
    return drift.to(out_dtype), ess.to(out_dtype)


def behavior_partials(
    logp: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    lam: float = 0.5,
    *,
    ess_level: str = "sequence",
) -> Tensor:
    """One share's sufficient statistics for `behavior_stats` (arguments as there): float64
    `[Σ|log ρ|, response tokens, LSE(s), LSE(2s), N]`, `s` the samples' log-weights (an empty
    share has LSEs of −inf and contributes nothing when combined)."""
    weights_fn = ESS_LEVELS.get(ess_level)
    m = mask.bool()
    log_ratio = torch.where(m, logp.double() - logp_old.double(), 0.0)  # [B, L]
    s, valid = weights_fn(log_ratio, m, lam)
    s = s.masked_fill(~valid, float("-inf")).flatten()
    return torch.stack([
        log_ratio.abs().sum(),
        m.sum().double(),
        torch.logsumexp(s, 0),
        torch.logsumexp(2 * s, 0),
        valid.sum().double(),
    ]).detach()  # [5]


def behavior_from_partials(partials: Tensor) -> tuple[Tensor, Tensor]:
    """(drift, ESS) of the union of the shares whose `behavior_partials` are the rows of
    `partials` [R, 5], float64: the sums add, the log-sum-exps combine by log-sum-exp."""
    p = partials.double()
    drift = p[:, 0].sum() / p[:, 1].sum().clamp_min(1)
    n = p[:, 4].sum()
    # LSE over shares of each share's LSE is the LSE over all samples; torch.logsumexp shifts by
    # the maximum, so weights of exp(±1000) stay finite. No sample anywhere: -inf - -inf = nan,
    # replaced by ESS 1 below.
    log_ess = (2 * torch.logsumexp(p[:, 2], 0) - torch.logsumexp(p[:, 3], 0)
               - torch.log(n.clamp_min(1)))
    ess = torch.where(n > 0, log_ess.exp().clamp(max=1.0), torch.ones_like(log_ess))
    return drift, ess
