"""The public API of issue 3, called the way the issue writes it (positional scalars included)."""

from __future__ import annotations

import torch

from vp2o.algo import grpo, specialization, stein, trust_region


def test_issue_signatures() -> None:
    gen = torch.Generator().manual_seed(0)
    e, d, f, t, k = 4, 6, 5, 10, 2
    assert stein.temperature(e, 1.0) == stein.temperature(e, tau0=1.0)
    w2 = torch.randn(e, d, f, generator=gen)
    u = stein.power_iteration(w2, torch.randn(e, d, generator=gen), 2)
    kern = stein.axial_kernel(u, 0.5)
    routing = torch.zeros(t, e, dtype=torch.bool).scatter_(
        1, torch.rand(t, e, generator=gen).topk(k, -1).indices, True
    )
    c = stein.coactivation(routing)
    m_co, m_in = stein.neighbour_masks(c, k, 0.1)
    assert stein.attraction(torch.randn(e, 7, generator=gen), kern, m_co).shape == (e, 7)
    assert stein.repulsion(w2, u, kern, m_in, 0.5, 2).shape == (e, d, f)
    x = torch.randn(t, k, d, generator=gen)
    assert specialization.orthogonality_loss(x, 1e-6).dim() == 0
    assert specialization.routing_variance_loss(torch.softmax(torch.randn(t, e), -1)).dim() == 0
    ids = torch.randint(0, e, (t, k), generator=gen)
    gates = torch.rand(t, k, generator=gen)
    assert trust_region.anchor_distance(ids, gates, u, ids, gates, u).dim() == 0
    logp = -torch.rand(3, 4, generator=gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    drift, ess = trust_region.behavior_stats(logp, logp, mask, 0.5)
    assert float(drift) == 0.0 and float(ess) == 1.0
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(
        grpo.group_advantages(rewards, 2, True), grpo.group_advantages(rewards, group_size=2)
    )
    assert grpo.kl_k3(logp, logp).abs().max() == 0
    loss, stats = grpo.policy_loss(logp, logp, torch.ones(3), mask, 0.2, 0.2, "token_mean")
    assert loss.dim() == 0 and "clip/high_frac" in stats
