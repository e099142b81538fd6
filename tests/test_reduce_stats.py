"""Statistics reduced over micro-batches as each key declares (``reduce_stats``), against
explicit computations over the whole batch; the cross-rank half runs end to end in
tests/e2e/test_scaleout.py (2 processes against 1)."""

from __future__ import annotations

import pytest
import torch

from vp2o.algo import grpo
from vp2o.mcore.parallel import reduce_stats


def _micro(values: list[float], tokens: list[int], key: str) -> list[dict]:
    return [{key: torch.tensor(v), "_tokens": torch.tensor(t)}
            for v, t in zip(values, tokens, strict=True)]


@pytest.mark.parametrize(("how", "expected"), [
    ("sum", 1.0 + 4.0 + 2.0),
    ("loss_share", 1.0 + 4.0 + 2.0),  # one rank: its loss is the sum of its shares
    ("max", 4.0),
    ("min", 1.0),
    ("token_mean", (1.0 * 3 + 4.0 * 1 + 2.0 * 6) / 10),
])
def test_each_reduction_over_micro_batches(init_parallel, how, expected):
    groups = init_parallel()
    out = reduce_stats(_micro([1.0, 4.0, 2.0], [3, 1, 6], "x"), {"x": how}, groups)
    assert float(out["x"]) == pytest.approx(expected)


def test_a_statistic_without_a_declared_reduction_is_refused(init_parallel):
    groups = init_parallel()
    with pytest.raises(KeyError, match="statistics without a reduction.*'y'"):
        reduce_stats([{"x": torch.tensor(1.0), "y": torch.tensor(2.0),
                       "_tokens": torch.tensor(1)}], {"x": "sum"}, groups)


@pytest.mark.parametrize("options", [
    {},
    {"clip_ratio_c": 3.0},
    {"kl_coeff": 0.1, "kl_estimator": "k1"},
    {"kl_coeff": 0.1, "kl_estimator": "k2", "pg_estimator": "gspo"},
])
def test_every_policy_loss_statistic_declares_its_reduction(init_parallel, options):
    """What policy_loss returns is exactly what grpo.POLICY_LOSS_STATS can reduce; and every
    statistic reduced over micro-batches as declared equals the same statistic of the whole batch
    in one call (with the whole batch's normaliser, as the trainer passes it), the ratio's mean
    and maximum also an explicit masked mean and max."""
    gen = torch.Generator().manual_seed(0)
    B, L = 6, 5
    logp = -torch.rand(B, L, generator=gen)
    old = logp + 0.3 * torch.randn(B, L, generator=gen)
    mask = torch.rand(B, L, generator=gen) > 0.3
    adv = torch.randn(B, generator=gen)
    kwargs = dict(clip_low=0.2, clip_high=0.2, **{k: v for k, v in options.items()})
    if "kl_coeff" in options:
        kwargs["logp_ref"] = logp - 0.1
    kwargs["denominator"] = mask.sum().float()  # the global batch's, on every micro-batch
    _, whole = grpo.policy_loss(logp, old, adv, mask, **kwargs)
    assert set(whole) <= set(grpo.POLICY_LOSS_STATS), set(whole) - set(grpo.POLICY_LOSS_STATS)
    # Micro-batches [0:2], [2:6]
    parts = []
    for rows in (slice(0, 2), slice(2, 6)):
        kw = {k: (v[rows] if torch.is_tensor(v) and v.dim() else v) for k, v in kwargs.items()}
        _, st = grpo.policy_loss(logp[rows], old[rows], adv[rows], mask[rows], **kw)
        parts.append({**st, "_tokens": mask[rows].sum()})
    out = reduce_stats(parts, grpo.POLICY_LOSS_STATS, init_parallel())
    assert set(out) == set(whole)
    for key, value in whole.items():
        assert float(out[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    if options.get("pg_estimator") != "gspo":  # gspo's ratio is per sequence
        ratio = torch.exp(logp - old)
        assert float(out["ratio/mean"]) == pytest.approx(float(ratio[mask].mean()), rel=1e-5)
        assert float(out["ratio/max"]) == pytest.approx(float(ratio[mask].max()), rel=1e-5)
