"""GRPO advantages, KL estimators and policy losses (method §1, §2).

Glossary: N responses, G group size (responses per prompt), B sequences of a micro-batch, L tokens
per sequence (padded), `mask` [B, L] marks response tokens.

What is here beyond the method's GRPO (§1), said plainly:

- `policy_loss` also offers what verl / NeMo-RL / TRL users expect: dual-clip (`clip_ratio_c`),
  KL estimators k1/k2/k3, four aggregations and GSPO (sequence-level ratios).
- VP2O's unclipped surrogate (§2) is `pg_estimator="ratio"` with `clip_low=clip_high=None`; its
  `logprob` estimator (§2) is `pg_estimator="logprob"`.
- Log-ratios are masked to 0 before exponentiating, so padding never produces inf/NaN (nor NaN
  gradients). No other clamping: a large ratio stays large.
- Groups of equal rewards get advantage exactly 0 (not `0/ε` round-off, not NaN).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vp2o.registry import Registry

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "aggregate",
    "batch_normaliser",
    "group_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "policy_loss",
]

KLFn = Callable[[Tensor, Tensor], Tensor]
AggFn = Callable[..., Tensor]
PolicyLossFn = Callable[..., tuple[Tensor, Tensor]]

KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")
AGGREGATIONS: Registry[AggFn] = Registry("loss aggregation")
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy-gradient estimator")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """`Σ values·mask / max(1, Σ mask)`, a 0-dim tensor."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# §1 advantages
# --------------------------------------------------------------------------------------------


def group_advantages(
    rewards: Tensor, group_size: int, normalize_std: bool = True, *, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages (§1): `A_i = (R_i − mean(R)) / (std(R) + ε)` within each group.

    `std` is the sample standard deviation (n − 1). `normalize_std=False` gives Dr. GRPO's
    `A_i = R_i − mean(R)`. Groups are contiguous: rewards[g*G:(g+1)*G] belong to prompt g. A group
    whose rewards are all equal (including G = 1) gets exactly 0.

    Args:
        rewards: R, [N], N a multiple of G.
        group_size: G >= 1.
        normalize_std: Divide by the group std (`advantage.normalize_std`).
        eps: ε.

    Returns:
        A, [N], rewards' dtype (float32 for integer rewards).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(
        -1, group_size
    )  # [N/G, G]
    centred = r - r.mean(-1, keepdim=True)
    if normalize_std:
        std = (centred.square().sum(-1, keepdim=True) / max(group_size - 1, 1)).sqrt()
        adv = centred / (std + eps)
    else:
        adv = centred
    constant = (r.amax(-1, keepdim=True) - r.amin(-1, keepdim=True)) == 0  # [N/G, 1]
    return adv.masked_fill(constant, 0.0).view(-1)  # [N]


# --------------------------------------------------------------------------------------------
# KL estimators (Schulman's k1/k2/k3), elementwise, of KL(π_θ ‖ π_ref)
# --------------------------------------------------------------------------------------------


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k1 = `log π_θ − log π_ref` (unbiased, high variance, can be negative). Elementwise."""
    return logp - logp_ref


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k2 = `½ (log π_θ − log π_ref)²` (biased, low variance, ≥ 0). Elementwise."""
    return 0.5 * (logp - logp_ref).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = `exp(q) − q − 1`, `q = log π_ref − log π_θ` (§1; unbiased, ≥ 0). Elementwise."""
    q = logp_ref - logp
    return torch.expm1(q) - q


# --------------------------------------------------------------------------------------------
# Aggregations of a per-token loss [B, L] (verl's agg_loss)
# --------------------------------------------------------------------------------------------


def _nonempty(mask: Tensor) -> Tensor:
    return mask.any(-1).sum().clamp_min(1)


@AGGREGATIONS.register("token_mean")
def _token_mean(
    values: Tensor,
    mask: Tensor,
    *,
    max_len: int | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """`Σ_{i,t} ℓ_it / N_tok` (§1 default); denominator: the token count."""
    m = mask.to(values.dtype)
    denom = m.sum().clamp_min(1) if denominator is None else denominator
    return (values * m).sum() / denom


@AGGREGATIONS.register("seq_mean_token_mean")
def _seq_mean_token_mean(
    values: Tensor,
    mask: Tensor,
    *,
    max_len: int | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """`mean_i (Σ_t ℓ_it / |y_i|)` (original GRPO); denominator: the non-empty sequence count."""
    m = mask.to(values.dtype)
    per_seq = (values * m).sum(-1) / m.sum(-1).clamp_min(1)  # [B]
    denom = _nonempty(mask) if denominator is None else denominator
    return per_seq.sum() / denom


@AGGREGATIONS.register("seq_mean_token_sum")
def _seq_mean_token_sum(
    values: Tensor,
    mask: Tensor,
    *,
    max_len: int | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """`mean_i Σ_t ℓ_it`; denominator: the non-empty sequence count."""
    m = mask.to(values.dtype)
    per_seq = (values * m).sum(-1)  # [B]
    denom = _nonempty(mask) if denominator is None else denominator
    return per_seq.sum() / denom


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(
    values: Tensor,
    mask: Tensor,
    *,
    max_len: int | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """`Σ_{i,t} ℓ_it / (B · L_max)` (Dr. GRPO): a constant normaliser.

    L_max is `max_len` (set it to the generation length limit), default the padded length L.
    """
    m = mask.to(values.dtype)
    if denominator is None:
        length = values.shape[-1] if max_len is None else max_len
        denominator = values.shape[0] * length
    return (values * m).sum() / denominator


def batch_normaliser(
    mask: Tensor, *, aggregation: str, max_len: int | None = None
) -> Tensor:
    """The normaliser `aggregate` divides by on a whole batch, as a float64 0-dim tensor.

    A batch split into micro-batches gives the whole batch's loss when every part is aggregated
    with this as `denominator` and the parts are summed (each per-token or per-sequence term is
    divided by the same number). Under data parallelism, sum it over the ranks' shares and divide
    by the number of ranks: the gradient average over ranks then equals the gradient of the
    union's loss, whatever the layout.

    Args:
        mask: Response-token mask of the whole batch (or one rank's share), [B, L].
        aggregation: One of `AGGREGATIONS.names()`.
        max_len: L_max of `seq_mean_token_sum_norm` (the generation length limit); default L.

    Returns:
        Response tokens (`token_mean`), non-empty sequences (`seq_mean_*`) or `B · L_max`
        (`seq_mean_token_sum_norm`). 0 for a share without response tokens: clamp the total
        (over shares) to at least 1, as `aggregate` does for one batch.
    """
    AGGREGATIONS.get(aggregation)  # a clear error for an unknown name
    m = mask.bool()
    if aggregation == "token_mean":
        return m.sum().double()
    if aggregation in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return m.any(-1).sum().double()
    if aggregation == "seq_mean_token_sum_norm":
        length = m.shape[-1] if max_len is None else max_len
        return torch.tensor(float(m.shape[0] * length), dtype=torch.float64)
    raise ValueError(
        f"loss aggregation {aggregation!r} has no batch normaliser: add it to "
        "grpo.batch_normaliser so micro-batches and data-parallel ranks share it"
    )


def aggregate(
    values: Tensor,
    mask: Tensor,
    *,
    aggregation: str,
    max_len: int | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """Aggregate a per-token loss with a registered aggregation.

    Args:
        values: ℓ, [B, L].
        mask: Response-token mask, [B, L] (bool or 0/1).
        aggregation: One of `AGGREGATIONS.names()`.
        max_len: L_max of `seq_mean_token_sum_norm`.
        denominator: Replaces the local normaliser (token count, sequence count or B·L_max), e.g.
            the global one over micro-batches and data-parallel ranks.

    Returns:
        0-dim tensor.
    """
    return AGGREGATIONS.get(aggregation)(values, mask, max_len=max_len, denominator=denominator)


# --------------------------------------------------------------------------------------------
# Per-token policy-gradient losses (§1, §2, GSPO)
# --------------------------------------------------------------------------------------------


def _clipped_surrogate(
    log_ratio: Tensor,
    adv: Tensor,
    *,
    clip_low: float | None,
    clip_high: float | None,
    clip_ratio_c: float | None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """`−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)`, then dual-clip `min(·, −cA)` for A < 0.

    log_ratio: [B, L] (0 at padding), adv: [B, 1]. Returns (ℓ [B, L], ρ [B, L], clip flags).
    """
    ratio = torch.exp(log_ratio)  # [B, L]
    loss = -adv * ratio
    lo = None if clip_low is None else 1.0 - clip_low
    hi = None if clip_high is None else 1.0 + clip_high
    flags: dict[str, Tensor] = {}
    if lo is not None or hi is not None:
        clipped = -adv * ratio.clamp(min=lo, max=hi)
        loss = torch.maximum(loss, clipped)
        false = torch.zeros_like(ratio, dtype=torch.bool)
        flags["clip/low_frac"] = false if lo is None else (ratio < lo) & (adv < 0)
        flags["clip/high_frac"] = false if hi is None else (ratio > hi) & (adv > 0)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"dual-clip needs clip_ratio_c > 1, got {clip_ratio_c}")
        dual = -adv * clip_ratio_c
        flags["clip/dual_frac"] = (adv < 0) & (loss > dual)
        loss = torch.where(adv < 0, torch.minimum(loss, dual), loss)
    return loss, ratio, flags


@POLICY_LOSSES.register("ratio")
def _ratio_loss(
    logp: Tensor, logp_old: Tensor, adv: Tensor, mask: Tensor, **clip: float | None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Token-ratio surrogate `ρ_it = π_θ/μ` (§1; unclipped with clip_low = clip_high = None, §2)."""
    log_ratio = torch.where(mask, logp - logp_old, 0.0)  # [B, L]
    return _clipped_surrogate(log_ratio, adv, **clip)


@POLICY_LOSSES.register("gspo")
def _gspo_loss(
    logp: Tensor, logp_old: Tensor, adv: Tensor, mask: Tensor, **clip: float | None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): sequence ratio `s_i = exp(mean_t log ρ_it)` used for every token.

    Token form `s_it = sg[s_i] · π_θ(y_t)/sg[π_θ(y_t)]`: value `s_i`, gradient `s_i ∇log π_θ(y_t)`;
    clipping decided by `s_i` (GSPO's ranges are small, e.g. 3e-4 / 4e-4).
    """
    diff = torch.where(mask, logp - logp_old, 0.0)  # [B, L]
    seq = diff.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
    live = torch.where(mask, logp, 0.0)
    log_ratio = torch.where(mask, live - live.detach() + seq.detach(), 0.0)  # [B, L]
    return _clipped_surrogate(log_ratio, adv, **clip)


@POLICY_LOSSES.register("logprob")
def _logprob_loss(
    logp: Tensor,
    logp_old: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    clip_low: float | None,
    clip_high: float | None,
    clip_ratio_c: float | None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """VP2O's `logprob` estimator (§2): `ℓ_it = −A_i log π_θ(y_it)`, no ratio (exact on-policy)."""
    if clip_low is not None or clip_high is not None or clip_ratio_c is not None:
        raise ValueError(
            "the logprob estimator has no ratio to clip; set clip_low=clip_high=clip_ratio_c=None"
        )
    ratio = torch.exp(torch.where(mask, logp - logp_old, 0.0)).detach()  # [B, L], for stats
    return -adv * torch.where(mask, logp, 0.0), ratio, {}


POLICY_LOSS_STATS: dict[str, str] = {
    "loss/policy": "loss_share",  # this micro-batch's share of the rank's loss (global normaliser)
    "loss/kl": "loss_share",
    "ratio/mean": "token_mean",
    "ratio/max": "max",
    "clip/low_frac": "token_mean",
    "clip/high_frac": "token_mean",
    "clip/dual_frac": "token_mean",
    **{f"kl/{name}": "token_mean" for name in KL_ESTIMATORS.names()},
}
"""How each statistic ``policy_loss`` returns combines over micro-batches and data-parallel
ranks (the reductions of ``vp2o.mcore.parallel.reduce_stats``): token means stay means over every
response token of the global batch, maxima the global maximum, loss shares the global loss."""


def policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    adv: Tensor,
    mask: Tensor,
    clip_low: float | None,
    clip_high: float | None,
    aggregation: str = "token_mean",
    *,
    pg_estimator: str = "ratio",
    clip_ratio_c: float | None = None,
    logp_ref: Tensor | None = None,
    kl_coeff: float = 0.0,
    kl_estimator: str = "k3",
    max_len: int | None = None,
    denominator: Tensor | float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO / VP2O policy loss (§1, §2): per-token surrogate, aggregation, optional KL penalty.

    `L = agg(ℓ_pg) + β_KL · agg(KL_est(π_θ ‖ π_ref))` with, for `pg_estimator`:

    - `ratio`: `ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)`, `ρ = exp(logp − logp_old)`; `None` for
      a bound removes it (both None: VP2O's unclipped `−ρA`, §2). Dual-clip (`clip_ratio_c = c`):
      `ℓ = min(ℓ, −cA)` where A < 0.
    - `gspo`: the same with the sequence-level ratio `exp(mean_t log ρ_it)`.
    - `logprob`: `ℓ = −A log π_θ` (§2; no clipping allowed).

    Args:
        logp: log π_θ of the sampled tokens, [B, L] (differentiable).
        logp_old: Behaviour log-probs log μ, [B, L].
        adv: Advantages, [B].
        mask: Response-token mask, bool [B, L] (0/1 floats accepted).
        clip_low: ε_low, or None.
        clip_high: ε_high, or None.
        aggregation: One of `AGGREGATIONS.names()` (`loss.aggregation`).
        pg_estimator: One of `POLICY_LOSSES.names()`.
        clip_ratio_c: Dual-clip constant c > 1, or None.
        logp_ref: log π_ref, [B, L]; needed when `kl_coeff != 0`, reported when given.
        kl_coeff: β_KL.
        kl_estimator: One of `KL_ESTIMATORS.names()`.
        max_len: L_max for `seq_mean_token_sum_norm`.
        denominator: Global normaliser, see `aggregate`.
        token_weights: [B, L] detached per-token weights of the policy-gradient term (the
            engine mismatch correction, `vp2o.algo.mismatch.correction_weights`), or None.

    Returns:
        (loss 0-dim, stats). Stats, detached 0-dim tensors: `loss/policy`, `ratio/mean`,
        `ratio/max`, `clip/low_frac`, `clip/high_frac` (and `clip/dual_frac` with dual-clip),
        `kl/<estimator>` with `logp_ref`, and `loss/kl` with `kl_coeff != 0`. Fractions and means
        are over response tokens.
    """
    pg_fn = POLICY_LOSSES.get(pg_estimator)
    agg = AGGREGATIONS.get(aggregation)
    mask = mask.bool()
    a = adv.to(logp.dtype).unsqueeze(-1)  # [B, 1]
    pg_tok, ratio, flags = pg_fn(
        logp, logp_old, a, mask, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c
    )  # [B, L]
    if token_weights is not None:
        pg_tok = pg_tok * token_weights.to(pg_tok.dtype)
    stats: dict[str, Tensor] = {}
    pg = agg(pg_tok, mask, max_len=max_len, denominator=denominator)
    loss = pg
    stats["loss/policy"] = pg.detach()
    ratio = ratio.detach()
    stats["ratio/mean"] = masked_mean(ratio, mask)
    stats["ratio/max"] = torch.where(mask, ratio, 0.0).amax() if ratio.numel() else ratio.sum()
    for key in ("clip/low_frac", "clip/high_frac"):
        stats[key] = (
            masked_mean(flags[key].to(ratio), mask) if key in flags else ratio.new_zeros(())
        )
    if "clip/dual_frac" in flags:
        stats["clip/dual_frac"] = masked_mean(flags["clip/dual_frac"].to(ratio), mask)
    if kl_coeff != 0.0 and logp_ref is None:
        raise ValueError("kl_coeff != 0 needs logp_ref (the reference policy's log-probs)")
    if logp_ref is not None:
        kl_fn = KL_ESTIMATORS.get(kl_estimator)
        kl_tok = kl_fn(torch.where(mask, logp, 0.0), torch.where(mask, logp_ref, 0.0))  # [B, L]
        stats[f"kl/{kl_estimator}"] = masked_mean(kl_tok.detach(), mask)
        if kl_coeff != 0.0:
            kl = kl_coeff * agg(kl_tok, mask, max_len=max_len, denominator=denominator)
            loss = loss + kl
            stats["loss/kl"] = kl.detach()
    return loss, stats
