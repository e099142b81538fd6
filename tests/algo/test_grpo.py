"""GRPO advantages, KL estimators, aggregations and policy losses (method §1-§2), by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vp2o.algo import grpo
from vp2o.registry import Registry

F64 = torch.float64


# ------------------------------------------------------------------ advantages


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    adv = grpo.group_advantages(rewards, group_size=4)
    std = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-6), -0.5 / (std + 1e-6)] * 1
    torch.testing.assert_close(
        adv[:4], torch.tensor([expected[0], expected[1], expected[1], expected[0]], dtype=F64)
    )
    assert torch.equal(adv[4:], torch.zeros(4, dtype=F64))  # equal rewards: exactly 0, no NaN
    dr = grpo.group_advantages(rewards, group_size=4, normalize_std=False)
    torch.testing.assert_close(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=F64))
    assert torch.equal(dr[4:], torch.zeros(4, dtype=F64))


def test_group_advantages_edge_cases() -> None:
    single = grpo.group_advantages(torch.tensor([3.0, 5.0]), group_size=1)
    assert torch.equal(single, torch.zeros(2))
    assert grpo.group_advantages(torch.tensor([1, 0, 1, 1]), group_size=2).dtype == torch.float32
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.group_advantages(torch.zeros(5), group_size=2)


# ------------------------------------------------------------------ KL estimators


def test_kl_estimators_by_hand() -> None:
    logp = torch.tensor([math.log(0.5), math.log(0.2)], dtype=F64)
    logp_ref = torch.tensor([math.log(0.25), math.log(0.2)], dtype=F64)
    ln2 = math.log(2)
    torch.testing.assert_close(grpo.kl_k1(logp, logp_ref), torch.tensor([ln2, 0.0], dtype=F64))
    torch.testing.assert_close(
        grpo.kl_k2(logp, logp_ref), torch.tensor([0.5 * ln2**2, 0.0], dtype=F64)
    )
    # k3: q = log(0.25/0.5) = -ln 2, exp(q) - q - 1 = 0.5 + ln 2 - 1
    torch.testing.assert_close(
        grpo.kl_k3(logp, logp_ref), torch.tensor([ln2 - 0.5, 0.0], dtype=F64)
    )
    assert grpo.KL_ESTIMATORS.names() == ("k1", "k2", "k3")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        grpo.KL_ESTIMATORS.get("k4")


def test_kl_k3_unbiased_for_sampled_tokens() -> None:
    """E_{y~π}[k3] = KL(π ‖ π_ref) for categorical distributions."""
    p = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    expected = float((p * (p / q).log()).sum())
    got = float((p * grpo.kl_k3(p.log(), q.log())).sum())
    assert got == pytest.approx(expected)


# ------------------------------------------------------------------ aggregations

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # third: empty


@pytest.mark.parametrize(
    "name,expected",
    [
        ("token_mean", (1 + 2 + 3 + 4) / 4),
        ("seq_mean_token_mean", (2 + 4) / 2),
        ("seq_mean_token_sum", (6 + 4) / 2),
        ("seq_mean_token_sum_norm", 10 / (3 * 3)),
    ],
)
def test_aggregations_by_hand(name: str, expected: float) -> None:
    assert float(grpo.aggregate(VALUES, MASK, aggregation=name)) == pytest.approx(expected)
    float_mask = MASK.to(F64)
    assert float(grpo.aggregate(VALUES, float_mask, aggregation=name)) == pytest.approx(expected)


def test_aggregation_normalisers() -> None:
    assert float(
        grpo.aggregate(VALUES, MASK, aggregation="seq_mean_token_sum_norm", max_len=5)
    ) == pytest.approx(10 / 15)
    assert float(
        grpo.aggregate(VALUES, MASK, aggregation="token_mean", denominator=20.0)
    ) == pytest.approx(0.5)
    assert float(
        grpo.aggregate(VALUES, MASK, aggregation="seq_mean_token_mean", denominator=4.0)
    ) == pytest.approx(6 / 4)
    assert float(grpo.aggregate(VALUES, torch.zeros_like(MASK), aggregation="token_mean")) == 0.0
    with pytest.raises(ValueError, match="seq_mean_token_mean, seq_mean_token_sum"):
        grpo.aggregate(VALUES, MASK, aggregation="mean")


# ------------------------------------------------------------------ policy loss

# ratios (1.5, 0.5) in both sequences, advantages (+1, -1)
LOGP_OLD = torch.zeros(2, 2, dtype=F64)
LOGP = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]], dtype=F64))
ADV = torch.tensor([1.0, -1.0], dtype=F64)
FULL = torch.ones(2, 2, dtype=torch.bool)


def test_clipped_loss_and_clip_fractions_by_hand() -> None:
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = grpo.policy_loss(logp, LOGP_OLD, ADV, FULL, clip_low=0.2, clip_high=0.2)
    # A=+1: -min(1.5, 1.2) = -1.2, -min(0.5, 0.8) = -0.5; A=-1: -min(-1.5,-1.2) = 1.5, 0.8
    assert float(loss.detach()) == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert float(stats["clip/high_frac"]) == pytest.approx(0.25)  # (0,0)
    assert float(stats["clip/low_frac"]) == pytest.approx(0.25)  # (1,1)
    assert float(stats["ratio/mean"]) == pytest.approx(1.0)
    assert float(stats["ratio/max"]) == pytest.approx(1.5)
    (grad,) = torch.autograd.grad(loss, logp)
    # clipped tokens get no gradient; others d(-ρA)/dlogp /4 = -ρA/4
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5 / 4], [1.5 / 4, 0.0]], dtype=F64))
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())


def test_asymmetric_and_one_sided_clipping() -> None:
    loss, stats = grpo.policy_loss(LOGP, LOGP_OLD, ADV, FULL, clip_low=0.2, clip_high=0.6)
    # 1.5 < 1.6: no high clip
    assert float(loss.detach()) == pytest.approx((-1.5 - 0.5 + 1.5 + 0.8) / 4)
    assert float(stats["clip/high_frac"]) == 0.0
    loss, stats = grpo.policy_loss(LOGP, LOGP_OLD, ADV, FULL, clip_low=None, clip_high=0.2)
    assert float(loss.detach()) == pytest.approx((-1.2 - 0.5 + 1.5 + 0.5) / 4)
    assert float(stats["clip/low_frac"]) == 0.0


def test_dual_clip_by_hand() -> None:
    loss, stats = grpo.policy_loss(
        LOGP, LOGP_OLD, ADV, FULL, clip_low=0.2, clip_high=0.2, clip_ratio_c=1.4
    )
    # A=-1, ρ=1.5: min(1.5, 1.4) = 1.4
    assert float(loss.detach()) == pytest.approx((-1.2 - 0.5 + 1.4 + 0.8) / 4)
    assert float(stats["clip/dual_frac"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="clip_ratio_c > 1"):
        grpo.policy_loss(LOGP, LOGP_OLD, ADV, FULL, clip_low=0.2, clip_high=0.2, clip_ratio_c=1.0)


def test_unclipped_vp2o_surrogate() -> None:
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = grpo.policy_loss(logp, LOGP_OLD, ADV, FULL, clip_low=None, clip_high=None)
    assert float(loss.detach()) == pytest.approx((-1.5 - 0.5 + 1.5 + 0.5) / 4)
    assert float(stats["clip/low_frac"]) == 0.0 and float(stats["clip/high_frac"]) == 0.0
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -torch.exp(LOGP) * ADV.unsqueeze(-1) / 4)


def test_logprob_estimator() -> None:
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = grpo.policy_loss(
        logp, LOGP_OLD, ADV, FULL, clip_low=None, clip_high=None, pg_estimator="logprob"
    )
    assert float(loss.detach()) == pytest.approx(float(-(ADV.unsqueeze(-1) * LOGP).mean()))
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -ADV.unsqueeze(-1).expand(2, 2) / 4)
    assert float(stats["ratio/mean"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no ratio to clip"):
        grpo.policy_loss(
            LOGP, LOGP_OLD, ADV, FULL, clip_low=0.2, clip_high=0.2, pg_estimator="logprob"
        )


def test_gspo_against_direct_sequence_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    logp0 = -torch.rand(3, 4, generator=gen, dtype=F64)
    logp_old = logp0 + 0.1 * torch.randn(3, 4, generator=gen, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    eps = 0.02

    logp = logp0.clone().requires_grad_(True)
    loss, stats = grpo.policy_loss(
        logp,
        logp_old,
        adv,
        mask,
        clip_low=eps,
        clip_high=eps,
        pg_estimator="gspo",
        aggregation="seq_mean_token_mean",
    )
    (grad,) = torch.autograd.grad(loss, logp)

    ref_logp = logp0.clone().requires_grad_(True)
    terms = []
    for i in range(3):
        m = mask[i]
        s = torch.exp((ref_logp[i][m] - logp_old[i][m]).mean())
        terms.append(-torch.minimum(s * adv[i], s.clamp(1 - eps, 1 + eps) * adv[i]))
    ref = torch.stack(terms).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    seq_ratio = torch.stack(
        [torch.exp((logp0[i][mask[i]] - logp_old[i][mask[i]]).mean()) for i in range(3)]
    )
    clipped_tokens = sum(
        int(mask[i].sum())
        for i in range(3)
        if (seq_ratio[i] > 1 + eps and adv[i] > 0) or (seq_ratio[i] < 1 - eps and adv[i] < 0)
    )
    assert float(stats["clip/high_frac"] + stats["clip/low_frac"]) == pytest.approx(
        clipped_tokens / 8
    )


def test_kl_penalty_and_stats() -> None:
    logp_ref = torch.log(torch.tensor([[1.0, 1.0], [2.0, 0.25]], dtype=F64))
    for name in ("k1", "k2", "k3"):
        loss, stats = grpo.policy_loss(
            LOGP,
            LOGP_OLD,
            ADV,
            FULL,
            clip_low=None,
            clip_high=None,
            logp_ref=logp_ref,
            kl_coeff=0.1,
            kl_estimator=name,
        )
        kl = grpo.KL_ESTIMATORS.get(name)(LOGP, logp_ref).mean()
        assert float(loss.detach()) == pytest.approx(0.0 + 0.1 * float(kl))  # pg part is 0 here
        assert float(stats[f"kl/{name}"]) == pytest.approx(float(kl))
        assert float(stats["loss/kl"]) == pytest.approx(0.1 * float(kl))
    with pytest.raises(ValueError, match="needs logp_ref"):
        grpo.policy_loss(LOGP, LOGP_OLD, ADV, FULL, clip_low=None, clip_high=None, kl_coeff=0.1)


def test_padding_never_produces_nan() -> None:
    logp = LOGP.clone()
    logp[1, 1] = float("-inf")
    old = LOGP_OLD.clone()
    old[1, 1] = 50.0
    mask = FULL.clone()
    mask[1, 1] = False
    leaf = logp.clone().requires_grad_(True)
    for est, clip in (("ratio", 0.2), ("gspo", 0.2), ("logprob", None)):
        loss, stats = grpo.policy_loss(
            leaf,
            old,
            ADV,
            mask,
            clip_low=clip,
            clip_high=clip,
            pg_estimator=est,
            logp_ref=LOGP_OLD,
            kl_coeff=0.1,
        )
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in stats.values())
        assert float(grad[1, 1]) == 0.0


def test_unknown_policy_loss_and_registry_duplicates() -> None:
    with pytest.raises(ValueError, match="gspo, logprob, ratio"):
        grpo.policy_loss(
            LOGP, LOGP_OLD, ADV, FULL, clip_low=None, clip_high=None, pg_estimator="ppo"
        )
    reg: Registry = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
