"""Engine/learner mismatch statistics and the TIS / MIS weights against loops over tokens."""

from __future__ import annotations

import math

import pytest
import torch

from vp2o.algo import grpo
from vp2o.algo.mismatch import correction_weights, mismatch_stats

LEARNER = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.1, -3.0, -1.0, -1.0]])
ENGINE = torch.tensor([[-1.5, -2.0, -0.4, 0.0], [-0.1, -1.0, -1.2, -9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)


def _tokens():
    return [(b, t) for b in range(2) for t in range(4) if MASK[b, t]]


def test_stats_match_a_token_loop():
    s = mismatch_stats(LEARNER, ENGINE, MASK)
    diffs = [float(LEARNER[b, t] - ENGINE[b, t]) for b, t in _tokens()]
    assert s["mismatch/abs_diff_mean"].item() == pytest.approx(sum(map(abs, diffs)) / 6)
    assert s["mismatch/abs_diff_max"].item() == pytest.approx(2.0)
    k3 = sum(math.exp(d) - 1 - d for d in diffs) / 6
    assert s["mismatch/k3"].item() == pytest.approx(k3, rel=1e-5)
    assert s["mismatch/seq_abs_diff_max"].item() == pytest.approx((0 + 2.0 + 0.2) / 3)


def test_tis_truncates_and_mis_masks():
    w, st = correction_weights(LEARNER, ENGINE, MASK, method="tis", tis_cap=1.5)
    for b, t in _tokens():
        expect = min(math.exp(float(LEARNER[b, t] - ENGINE[b, t])), 1.5)
        assert w[b, t].item() == pytest.approx(expect, rel=1e-6)
    assert w[~MASK].eq(0).all()
    assert st["correction/changed_frac"].item() == pytest.approx(1 / 6)  # exp(0.5) > 1.5
    w, _ = correction_weights(LEARNER, ENGINE, MASK, method="mis", mis_low=0.5, mis_high=1.5)
    keep = [0.5 <= math.exp(float(LEARNER[b, t] - ENGINE[b, t])) <= 1.5 for b, t in _tokens()]
    assert [bool(w[b, t]) for b, t in _tokens()] == keep
    w, _ = correction_weights(LEARNER, ENGINE, MASK, method="mis", mis_level="sequence",
                              mis_low=0.6, mis_high=1.5)
    assert w[0, :3].eq(1).all() and w[1].eq(0).all()  # row 1: exp(mean d = -0.6) < 0.6


def test_token_weights_scale_the_policy_term():
    logp = LEARNER.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    w, _ = correction_weights(LEARNER, ENGINE, MASK, method="tis", tis_cap=2.0)
    loss, _ = grpo.policy_loss(logp, LEARNER, adv, MASK, None, None, token_weights=w)
    loss.backward()
    plain = LEARNER.clone().requires_grad_(True)
    grpo.policy_loss(plain, LEARNER, adv, MASK, None, None)[0].backward()
    assert torch.allclose(logp.grad, plain.grad * w)
