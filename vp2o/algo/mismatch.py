"""Engine/learner log-prob mismatch: its statistics and the TIS / MIS corrections (pure torch).

An inference engine (vLLM) and the learner (megatron) compute log-probs of the same tokens at the
same weights with different kernels, so ``log mu_engine`` and ``log pi_learner`` differ a little
(more in bf16). With ``d = log pi_learner - log mu_engine`` at each response token:

- statistics: mean and max |d|, the k3 estimate of KL(mu || pi) (``exp(d) - 1 - d``, >= 0), and
  the largest per-sequence mean |d|;
- TIS (token-level truncated importance sampling): weight each token's policy-gradient term by
  ``min(exp(d), cap)``; the PPO ratio is then formed against the learner's own log-probs;
- MIS (masked importance sampling): weight 0 for tokens whose ``exp(d)`` leaves
  ``[low, high]`` (level ``token``), or for whole sequences whose geometric-mean ratio
  ``exp(mean_t d)`` does (level ``sequence``), 1 elsewhere.

Glossary: B sequences, L columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

MISMATCH_STATS: dict[str, str] = {
    "mismatch/abs_diff_mean": "token_mean",
    "mismatch/abs_diff_max": "max",
    "mismatch/k3": "token_mean",
    "mismatch/seq_abs_diff_max": "max",
    "correction/weight_mean": "token_mean",
    "correction/changed_frac": "token_mean",
}
"""How each statistic combines over micro-batches and data-parallel ranks
(``vp2o.mcore.parallel.reduce_stats``). ``mismatch/seq_abs_diff_max``: the largest per-sequence
mean |d|; ``correction/changed_frac``: tokens whose weight is not 1 (truncated by TIS, dropped by
MIS)."""


def mismatch_stats(logp_learner: Tensor, logp_engine: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The ``mismatch/*`` statistics of one micro-batch ([B, L] each; 0-dim results)."""
    mask = mask.bool()
    d = (logp_learner.detach().float() - logp_engine.float()).masked_fill(~mask, 0.0)
    n = mask.sum().clamp_min(1)
    per_seq = d.abs().sum(-1) / mask.sum(-1).clamp_min(1)  # [B]
    return {
        "mismatch/abs_diff_mean": d.abs().sum() / n,
        "mismatch/abs_diff_max": d.abs().amax() if d.numel() else d.new_zeros(()),
        "mismatch/k3": (torch.expm1(d) - d).masked_fill(~mask, 0.0).sum() / n,
        "mismatch/seq_abs_diff_max": per_seq.amax() if per_seq.numel() else d.new_zeros(()),
    }


def correction_weights(logp_learner: Tensor, logp_engine: Tensor, mask: Tensor, *, method: str,
                       tis_cap: float = 2.0, mis_low: float = 0.5, mis_high: float = 2.0,
                       mis_level: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token weights [B, L] (detached, 0 outside ``mask``) and the ``correction/*`` stats.

    Args:
        logp_learner: the learner's log-probs at the rollout weights, [B, L].
        logp_engine: the engine's behaviour log-probs, [B, L].
        mask: response tokens, [B, L].
        method: ``tis`` or ``mis`` (``none``: all ones).
    """
    mask = mask.bool()
    d = (logp_learner.detach().float() - logp_engine.float()).masked_fill(~mask, 0.0)
    ratio = torch.exp(d)
    if method == "tis":
        w = ratio.clamp(max=tis_cap)
    elif method == "mis":
        if mis_level == "sequence":
            seq = torch.exp(d.sum(-1) / mask.sum(-1).clamp_min(1)).unsqueeze(-1)  # [B, 1]
            keep = (seq >= mis_low) & (seq <= mis_high)
            keep = keep.expand_as(d)
        else:
            keep = (ratio >= mis_low) & (ratio <= mis_high)
        w = keep.float()
    elif method == "none":
        w = torch.ones_like(d)
    else:
        raise ValueError(f"unknown mismatch correction {method!r}; choose none, tis or mis")
    w = w.masked_fill(~mask, 0.0)
    n = mask.sum().clamp_min(1)
    changed = (w != ratio) if method == "tis" else (w != 1.0)
    return w, {
        "correction/weight_mean": w.sum() / n,
        "correction/changed_frac": (changed & mask).sum() / n,
    }
