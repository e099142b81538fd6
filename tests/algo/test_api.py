"""The public API of issue 3, called the way the issue writes it (positional scalars included),
each value checked against a loop written from the method's formula (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vp2o.algo import grpo, specialization, stein, trust_region

F64 = torch.float64


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def test_issue_signatures() -> None:
    gen = torch.Generator().manual_seed(0)
    e, d, f, t, k = 4, 6, 5, 10, 2

    # §5 temperature τ = τ0 / log E
    assert stein.temperature(e, 1.0) == stein.temperature(e, tau0=1.0) == 1.0 / math.log(e)

    # §4 power iteration: u <- normalize(W2 (W2ᵀ u)), per expert
    w2 = torch.randn(e, d, f, generator=gen, dtype=F64)
    u0 = torch.randn(e, d, generator=gen, dtype=F64)
    u = stein.power_iteration(w2, u0, 2)
    for j in range(e):
        x = _unit(u0[j])
        for _ in range(2):
            x = _unit(w2[j] @ (w2[j].T @ x))
        assert_close(u[j], x)

    # §5 axial kernel K_ij = exp(−(1 − (u_iᵀu_j)²) / τ), K_jj = 1
    kern = stein.axial_kernel(u, 0.5)
    for i in range(e):
        for j in range(e):
            want = 1.0 if i == j else math.exp(-(1 - float(u[i] @ u[j]) ** 2) / 0.5)
            assert float(kern[i, j]) == pytest.approx(want, rel=1e-12)

    # §3 co-activation C_ij = (1/T) Σ_t r_ti r_tj
    routing = torch.zeros(t, e, dtype=torch.bool).scatter_(
        1, torch.rand(t, e, generator=gen).topk(k, -1).indices, True
    )
    c = stein.coactivation(routing)
    for i in range(e):
        for j in range(e):
            both = sum(bool(routing[s, i] and routing[s, j]) for s in range(t))
            assert float(c[i, j]) == pytest.approx(both / t)

    # §3.2 masks: j itself, its k largest positive off-diagonal C_ji (ties: lower index), and
    # every i with C_ji >= c_min C_jj > 0; M_in the other experts
    m_co, m_in = stein.neighbour_masks(c, k, 0.1)
    for j in range(e):
        others = sorted((i for i in range(e) if i != j), key=lambda i: (-float(c[j, i]), i))
        want = {j} | {i for i in others[:k] if c[j, i] > 0}
        want |= {i for i in range(e) if 0 < 0.1 * c[j, j] <= c[j, i]}
        assert {i for i in range(e) if m_co[j, i]} == want
        assert {i for i in range(e) if m_in[j, i]} == set(range(e)) - want

    # §6 attraction φ_j = Σ_i a_ji g_i, a_ji = M_co k_ji / Σ_l M_co k_jl
    kern32 = kern.float()
    g = torch.randn(e, 7, generator=gen)
    att = stein.attraction(g, kern32, m_co)
    for j in range(e):
        weights = [float(m_co[j, i] * kern32[j, i]) for i in range(e)]
        want = sum(w * g[i] for i, w in enumerate(weights)) / sum(weights)
        assert_close(att[j], want)

    # §7 repulsion: the hand-written backward against autograd, v_ji = M_in k_ji / Σ_l M_in k_jl
    rep = stein.repulsion(w2, u, kern, m_in, 0.5, 2)
    v = torch.zeros(e, e, dtype=F64)
    for j in range(e):
        total = sum(float(m_in[j, i] * kern[j, i]) for i in range(e))
        for i in range(e):
            v[j, i] = float(m_in[j, i] * kern[j, i]) / max(total, 1e-12)
    assert_close(rep, stein.repulsion_autograd(w2, u, v, tau=0.5, iters=2))
    assert rep.abs().sum() > 0

    # §9 orthogonality L_o = (1/(T k)) Σ_t Σ_j Σ_{l≠j} ‖(⟨x_tj, x_tl⟩ / (⟨x_tl, x_tl⟩ + ε)) x_tl‖²
    x = torch.randn(t, k, d, generator=gen, dtype=F64)
    want = 0.0
    for s in range(t):
        for j in range(k):
            for l_ in range(k):
                if l_ != j:
                    q = float(x[s, l_] @ x[s, l_])
                    want += (float(x[s, j] @ x[s, l_]) / (q + 1e-6)) ** 2 * q
    assert float(specialization.orthogonality_loss(x, 1e-6)) == pytest.approx(want / (t * k))

    # §9 routing variance L_v = −(1/E) Σ_j (population variance over tokens of s_tj)
    scores = torch.softmax(torch.randn(t, e, generator=gen, dtype=F64), -1)
    want = -sum(float(scores[:, j].var(unbiased=False)) for j in range(e)) / e
    assert float(specialization.routing_variance_loss(scores)) == pytest.approx(want)

    # §10 anchor distance: mean_t ‖Σ ĝ_tj s_j u_j − Σ ĝ^anc_tj u^anc_j‖, s_j = sign(u_jᵀu^anc_j)
    ids = torch.randint(0, e, (t, k), generator=gen)
    gates = torch.rand(t, k, generator=gen, dtype=F64)
    ids_anc = torch.randint(0, e, (t, k), generator=gen)
    gates_anc = torch.rand(t, k, generator=gen, dtype=F64)
    u_anc = torch.nn.functional.normalize(u + 0.3 * torch.randn(e, d, generator=gen), dim=-1)
    u_anc[1] = -u_anc[1]  # a prototype whose sign flipped: aligned before the distance
    assert float(trust_region.anchor_distance(ids, gates, u, ids, gates, u)) == 0.0
    assert float(trust_region.anchor_distance(ids, gates, u, ids, gates, -u)) == 0.0
    aligned = [u[j] if float(u[j] @ u_anc[j]) >= 0 else -u[j] for j in range(e)]
    dists = []
    for s in range(t):
        b = sum(gates[s, a] * aligned[ids[s, a]] for a in range(k)) / gates[s].sum()
        b_anc = sum(gates_anc[s, a] * u_anc[ids_anc[s, a]] for a in range(k)) / gates_anc[s].sum()
        dists.append(float((b - b_anc).norm()))
    got = trust_region.anchor_distance(ids, gates, u, ids_anc, gates_anc, u_anc)
    assert float(got) == pytest.approx(sum(dists) / t)

    # §11 drift = mean |log ρ| over response tokens; ESS = (Σ w)² / (N Σ w²), w_i = ρ_i^λ
    logp = -torch.rand(3, 4, generator=gen, dtype=F64)
    logp_old = logp + 0.3 * torch.randn(3, 4, generator=gen, dtype=F64)
    logp_old[0, 0] = logp[0, 0] - 0.5  # ρ = 1.65 at a positive advantage below: clipped high
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    drift, ess = trust_region.behavior_stats(logp, logp, mask, 0.5)
    assert float(drift) == 0.0 and float(ess) == 1.0
    drift, ess = trust_region.behavior_stats(logp, logp_old, mask, 0.5)
    log_rho = [[float(logp[i, s] - logp_old[i, s]) for s in range(4) if mask[i, s]]
               for i in range(3)]
    assert float(drift) == pytest.approx(sum(abs(r) for row in log_rho for r in row) / 11)
    w = [math.exp(0.5 * sum(row)) for row in log_rho]
    assert float(ess) == pytest.approx(sum(w) ** 2 / (3 * sum(x * x for x in w)))

    # §1 group advantages (R − mean) / (std + ε), sample std; a constant group gets 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = grpo.group_advantages(rewards, 2, True)
    assert_close(adv, grpo.group_advantages(rewards, group_size=2))
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert adv.tolist() == pytest.approx([a, -a, 0.0, 0.0])

    # §1 k3 = exp(q) − q − 1, q = log π_ref − log π_θ
    assert grpo.kl_k3(logp, logp).abs().max() == 0
    q = logp_old - logp
    assert_close(grpo.kl_k3(logp, logp_old), torch.exp(q) - q - 1)

    # §1 clipped surrogate −min(ρA, clip(ρ, 1−ε, 1+ε)A), token mean
    adv3 = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    loss, stats = grpo.policy_loss(logp, logp_old, adv3, mask, 0.2, 0.2, "token_mean")
    terms, low, high = [], 0, 0
    for i in range(3):
        for s in range(4):
            if mask[i, s]:
                rho = math.exp(float(logp[i, s] - logp_old[i, s]))
                A = float(adv3[i])
                terms.append(-min(rho * A, min(max(rho, 0.8), 1.2) * A))
                low += rho < 0.8 and A < 0
                high += rho > 1.2 and A > 0
    assert low > 0 and high > 0  # both clips are exercised
    assert float(loss) == pytest.approx(sum(terms) / len(terms))
    assert float(stats["loss/policy"]) == pytest.approx(sum(terms) / len(terms))
    assert float(stats["clip/low_frac"]) == pytest.approx(low / len(terms))
    assert float(stats["clip/high_frac"]) == pytest.approx(high / len(terms))
