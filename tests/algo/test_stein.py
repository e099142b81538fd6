"""Stein transport (method §3-§8): vectorised code against loops written from the method text."""

from __future__ import annotations

import math

import numpy as np
import oracles
import pytest
import torch

from vp2o.algo import stein

F64 = torch.float64


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _with_spectrum(e: int, d: int, f: int, spectrum: list[float], seed: int) -> torch.Tensor:
    """[E, d, f] matrices W = U diag(s) Vᵀ with the given leading singular values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    r = min(d, f)
    s = torch.tensor(spectrum + [0.1] * (r - len(spectrum)), dtype=F64)[:r]
    for _ in range(e):
        uu, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=F64))
        vv, _ = torch.linalg.qr(torch.randn(f, r, generator=gen, dtype=F64))
        out.append(uu @ torch.diag(s) @ vv.T)
    return torch.stack(out)


def _top_left_singular(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(w.double())[0][..., :, 0]  # [..., d]


# ------------------------------------------------------------------ §4 power iteration


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_power_iteration_matches_svd_on_random_matrices(dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 12, 9, generator=gen, dtype=F64)
    u0 = torch.randn(5, 12, generator=gen, dtype=F64)
    u = stein.power_iteration(w.to(dtype), u0.to(dtype), iters=500)
    assert u.dtype == dtype
    ref = _top_left_singular(w)
    cos = (u.double() * ref).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones(5, dtype=F64), atol=tol, rtol=0)
    torch.testing.assert_close(u.double().norm(dim=-1), torch.ones(5, dtype=F64), atol=tol, rtol=0)


def test_power_iteration_near_degenerate() -> None:
    # gap 1 vs 0.97: converges, slowly, to the top singular vector
    w = _with_spectrum(3, 16, 10, [1.0, 0.97, 0.5], seed=1)
    u0 = torch.randn(3, 16, generator=torch.Generator().manual_seed(2), dtype=F64)
    u = stein.power_iteration(w, u0, iters=600)
    cos = (u * _top_left_singular(w)).sum(-1).abs()
    assert torch.all(cos > 1 - 1e-9)
    # exactly degenerate (1, 1): any unit vector of the top-2 left singular space is right;
    # check the Rayleigh quotient reaches σ1 and u lies in that space.
    w = _with_spectrum(3, 16, 10, [1.0, 1.0, 0.5], seed=3)
    u = stein.power_iteration(w, u0, iters=200)
    rayleigh = (u.unsqueeze(-2) @ w).squeeze(-2).norm(dim=-1)
    torch.testing.assert_close(rayleigh, torch.ones(3, dtype=F64), atol=1e-10, rtol=0)
    top2 = torch.linalg.svd(w)[0][..., :2]  # [E, d, 2]
    in_span = (top2.mT @ u.unsqueeze(-1)).squeeze(-1).norm(dim=-1)
    torch.testing.assert_close(in_span, torch.ones(3, dtype=F64), atol=1e-10, rtol=0)


def test_power_iteration_warm_start_converges_and_keeps_sign() -> None:
    w = _with_spectrum(4, 16, 10, [1.0, 0.8, 0.3], seed=4)
    ref = _top_left_singular(w)
    noise = 0.05 * torch.randn(4, 16, generator=torch.Generator().manual_seed(5), dtype=F64)
    start = _unit(-ref + noise)  # start near -u*: the sign is kept
    err0 = (start + ref).norm(dim=-1)
    u1 = stein.power_iteration(w, start, iters=1)
    u2 = stein.power_iteration(w, start, iters=2)
    err1, err2 = (u1 + ref).norm(dim=-1), (u2 + ref).norm(dim=-1)
    # each step contracts the error by about (σ2/σ1)² = 0.64
    assert torch.all(err1 < 0.7 * err0) and torch.all(err2 < 0.7 * err1)
    fixed = stein.power_iteration(w, ref, iters=3)
    torch.testing.assert_close(fixed, ref, atol=1e-12, rtol=0)


def test_power_iteration_layer_dim_half_precision_and_chunks() -> None:
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(2, 3, 8, 6, generator=gen)
    u0 = torch.randn(2, 3, 8, generator=gen)
    batched = stein.power_iteration(w, u0, iters=3)  # [layers, E, d]
    for layer in range(2):
        torch.testing.assert_close(
            batched[layer], stein.power_iteration(w[layer], u0[layer], iters=3)
        )
    for chunk in (1, 2, None):
        torch.testing.assert_close(
            stein.refresh_prototypes(w, u0, iters=3, expert_chunk=chunk), batched
        )
    half = stein.power_iteration(w.bfloat16(), u0, iters=3)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.norm(dim=-1), torch.ones(2, 3))


def test_power_iteration_is_differentiable() -> None:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(2, 5, 4, generator=gen, dtype=F64, requires_grad=True)
    u0 = torch.randn(2, 5, generator=gen, dtype=F64)
    assert torch.autograd.gradcheck(lambda m: stein.power_iteration(m, u0, iters=2), (w,))


def test_init_prototypes_deterministic_and_converged() -> None:
    w = _with_spectrum(3, 16, 10, [1.0, 0.5], seed=8)
    a = stein.init_prototypes(w, iters=20, seed=0)
    b = stein.init_prototypes(w, iters=20, seed=0)
    assert torch.equal(a, b)
    cos = (a * _top_left_singular(w)).sum(-1).abs()
    assert torch.all(cos > 1 - 1e-9)
    # expert parallelism: a rank holding experts 1..2 of 3 gets the same rows, signs included
    part = stein.init_prototypes(w[1:], iters=20, seed=0, experts=slice(1, 3), num_experts=3)
    torch.testing.assert_close(part, a[1:], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="selects 1 of the start rows, w2 has 2"):
        stein.init_prototypes(w[1:], experts=slice(0, 1), num_experts=3)


def test_power_iteration_allreduce_over_shards() -> None:
    """Expert tensor parallelism: W2 split along f, the d-vectors summed over shards."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(3, 8, 6, generator=gen, dtype=F64)
    u0 = torch.randn(3, 8, generator=gen, dtype=F64)
    shards = torch.stack(w.chunk(2, dim=-1))  # [2 shards, E, d, f/2]

    def allreduce(s: torch.Tensor) -> torch.Tensor:
        return s.sum(0, keepdim=True).expand_as(s)

    got = stein.power_iteration(shards, u0.expand(2, 3, 8), iters=4, allreduce=allreduce)
    ref = stein.power_iteration(w, u0, iters=4)
    torch.testing.assert_close(got[0], ref)
    torch.testing.assert_close(got[1], ref)


# ------------------------------------------------------------------ §5 kernel


def test_temperature() -> None:
    assert stein.temperature(8) == pytest.approx(1 / math.log(8))
    assert stein.temperature(64, tau0=2.0) == pytest.approx(2 / math.log(64))
    with pytest.raises(ValueError, match="at least 2 experts"):
        stein.temperature(1)


def test_axial_kernel_properties() -> None:
    e = 6
    u = _unit(torch.randn(e, 10, generator=torch.Generator().manual_seed(10), dtype=F64))
    k = stein.axial_kernel(u, tau=0.7)
    assert torch.equal(k.diagonal(), torch.ones(e, dtype=F64))
    torch.testing.assert_close(k, k.T)
    signs = torch.tensor([1, -1, 1, -1, -1, 1], dtype=F64).unsqueeze(-1)
    torch.testing.assert_close(stein.axial_kernel(u * signs, tau=0.7), k)
    ref = torch.tensor(
        [[math.exp(-(1 - float(u[i] @ u[j]) ** 2) / 0.7) for j in range(e)] for i in range(e)],
        dtype=F64,
    )
    torch.testing.assert_close(k, ref)


@pytest.mark.parametrize("e", [2, 4, 8])
def test_orthogonal_experts_get_one_over_e(e: int) -> None:
    u = torch.eye(e, 12, dtype=F64)  # mutually orthogonal prototypes
    k = stein.axial_kernel(u, tau=stein.temperature(e, tau0=1.0))
    off = ~torch.eye(e, dtype=torch.bool)
    torch.testing.assert_close(k[off], torch.full((e * (e - 1),), 1 / e, dtype=F64))


def test_median_temperature_against_numpy() -> None:
    u = _unit(torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(11), dtype=F64))
    tau = stein.median_temperature(u, tau0=1.5)
    for layer in range(2):
        un = u[layer].numpy()
        cos = un @ un.T
        vals = [1 - cos[i, j] ** 2 for i in range(7) for j in range(7) if i != j]
        assert float(tau[layer]) == pytest.approx(1.5 * np.median(vals) / math.log(7))


# ------------------------------------------------------------------ §3 co-activation and masks


def _routing(t: int, e: int, k: int, seed: int, inactive: tuple[int, ...] = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(t, e, generator=gen)
    scores[:, list(inactive)] = -1.0
    ids = scores.topk(k, dim=-1).indices
    return torch.zeros(t, e, dtype=torch.bool).scatter_(1, ids, True)


def test_coactivation_against_loop() -> None:
    r = _routing(40, 6, 2, seed=12, inactive=(4,))
    c = stein.coactivation(r)
    ref = torch.zeros(6, 6)
    for t in range(40):
        for i in range(6):
            for j in range(6):
                ref[i, j] += float(r[t, i] and r[t, j]) / 40
    torch.testing.assert_close(c, ref)
    assert float(c[4, 4]) == 0.0
    torch.testing.assert_close(c.diagonal(), r.float().mean(0))
    stacked = stein.coactivation(torch.stack([r, r.flip(0)]))  # layer dim
    torch.testing.assert_close(stacked[1], c)
    assert torch.equal(stein.coactivation(torch.zeros(0, 3, dtype=torch.bool)), torch.zeros(3, 3))


def _masks_loop(c: torch.Tensor, top_m: int, min_frac: float) -> tuple[list, list]:
    e = c.shape[0]
    co = [[False] * e for _ in range(e)]
    for j in range(e):
        order = sorted((i for i in range(e) if i != j), key=lambda i: -float(c[j, i]))
        top = set(order[:top_m])
        for i in range(e):
            thr = min_frac * float(c[j, j])
            frac_ok = float(c[j, i]) >= thr * (1 - 1e-6) and thr > 0  # ties within rounding
            co[j][i] = i == j or (i in top and float(c[j, i]) > 0) or frac_ok
    inn = [[(not co[j][i]) and i != j for i in range(e)] for j in range(e)]
    return co, inn


@pytest.mark.parametrize("top_m,min_frac", [(2, 0.1), (0, 0.3), (3, 0.0), (10, 0.5)])
def test_neighbour_masks_against_loop(top_m: int, min_frac: float) -> None:
    # distinct co-activation values (no top-m ties), one inactive expert
    c = stein.coactivation(_routing(500, 7, 2, seed=13, inactive=(6,)))
    m_co, m_in = stein.neighbour_masks(c, top_m=top_m, min_frac=min_frac)
    co, inn = _masks_loop(c, top_m, min_frac)
    assert m_co.tolist() == co
    assert m_in.tolist() == inn
    assert m_co.diagonal().all() and not m_in.diagonal().any()
    assert m_co[6].tolist() == [False] * 6 + [True]  # inactive: only itself
    assert not m_co[:6, 6].any()  # and nobody's co-active neighbour


def test_neighbour_mask_ties_go_to_the_lower_index() -> None:
    """C is a matrix of token counts, so equal entries are common: the top-m takes the lower
    index among equals (the loop's stable sort), on any device (tests/algo/test_cuda.py)."""
    c = torch.tensor([[4, 1, 2, 2, 2, 1],
                      [1, 4, 1, 1, 1, 1],
                      [2, 1, 4, 2, 0, 2],
                      [2, 1, 2, 4, 2, 2],
                      [2, 1, 0, 2, 4, 2],
                      [1, 1, 2, 2, 2, 4]], dtype=torch.float32) / 10
    for top_m in (1, 2, 3):
        m_co, m_in = stein.neighbour_masks(c, top_m=top_m, min_frac=0.0)
        co, inn = _masks_loop(c, top_m, 0.0)
        assert m_co.tolist() == co and m_in.tolist() == inn, top_m
    m_co, _ = stein.neighbour_masks(c, top_m=2, min_frac=0.0)
    assert m_co[1].nonzero().flatten().tolist() == [0, 1, 2]  # five-way tie: experts 0 and 2
    # the c_min criterion at an exact tie, C_ji = c_min C_jj (2 of 20 tokens), with C rounded the
    # way each device divides by T: counted on both sides
    counts = torch.tensor([[20.0, 2.0, 1.0], [2.0, 5.0, 0.0], [1.0, 0.0, 3.0]])
    for c in (counts / 200, counts * (1 / 200), counts.double() / 200):
        m_co, _ = stein.neighbour_masks(c, top_m=0, min_frac=0.1)
        assert m_co[0].tolist() == [True, True, False], c.dtype


# ------------------------------------------------------------------ §6 attraction


def _attraction_loop(g: torch.Tensor, k: torch.Tensor, m_co: torch.Tensor) -> torch.Tensor:
    """φ_att(j) = Σ_i a_ji g_i, a_ji = M_co[j,i] k_ji / Σ_l M_co[j,l] k_jl (method §6)."""
    e = g.shape[0]
    out = torch.zeros_like(g)
    for j in range(e):
        denom = sum(float(m_co[j, n]) * float(k[j, n]) for n in range(e))
        for i in range(e):
            out[j] += float(m_co[j, i]) * float(k[j, i]) / denom * g[i]
    return out


def _layer(e: int = 6, d: int = 8, f: int = 5, seed: int = 14, inactive=(5,)):
    gen = torch.Generator().manual_seed(seed)
    w2 = torch.randn(e, d, f, generator=gen, dtype=F64)
    u = stein.power_iteration(w2, torch.randn(e, d, generator=gen, dtype=F64), iters=3)
    c = stein.coactivation(_routing(300, e, 2, seed=seed, inactive=inactive)).double()
    return w2, u, c


def test_attraction_against_loop_and_inactive_rows_pass_through() -> None:
    w2, u, c = _layer()
    g = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(15), dtype=F64)
    k = stein.axial_kernel(u, tau=0.6)
    m_co, _ = stein.neighbour_masks(c, top_m=2, min_frac=0.1)
    active = c.diagonal() > 0
    got = stein.attraction(g, k, m_co)
    torch.testing.assert_close(got, _attraction_loop(g, k, m_co))
    assert torch.equal(got[5], g[5])  # inactive expert: exactly g_j
    # with `active`, inactive rows are e_j whatever the mask says
    full = torch.ones(6, 6, dtype=torch.bool)
    forced = stein.attraction(g, k, full, active=active)
    assert torch.equal(forced[5], g[5])
    torch.testing.assert_close(forced[:5], _attraction_loop(g, k, full)[:5])


def test_attraction_identity_mask_is_identity_and_out_views() -> None:
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(16))
    k = torch.rand(5, 5, generator=torch.Generator().manual_seed(17)) + 0.1
    assert torch.equal(stein.attraction(g, k, torch.eye(5, dtype=torch.bool)), g)
    buf = torch.full((5, 10), float("nan"))
    out = buf[:, 3:]  # strided view
    res = stein.attraction(g, k, torch.ones(5, 5, dtype=torch.bool), out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(buf[:, 3:], _attraction_loop(g, k, torch.ones(5, 5)))
    assert torch.isnan(buf[:, :3]).all()


# ------------------------------------------------------------------ §7 repulsion


def _repulsion_loop(w2, u, k, m_in, tau, iters, eps=1e-12):
    """φ_rep(j) = ∇_{W2_j} Σ_i v_ji k(u_i, u'_j(W2_j)), written per expert (method §7)."""
    e = w2.shape[0]
    rows = []
    for j in range(e):
        denom = max(eps, sum(float(m_in[j, n]) * float(k[j, n]) for n in range(e)))
        wj = w2[j].clone().requires_grad_(True)
        x = u[j].detach().clone()
        for _ in range(iters):
            x = wj @ (wj.T @ x)
            x = x / x.norm()
        total = 0.0
        for i in range(e):
            v_ji = float(m_in[j, i]) * float(k[j, i]) / denom
            total = total + v_ji * torch.exp(-(1 - (u[i].detach() @ x) ** 2) / tau)
        if isinstance(total, float):
            rows.append(torch.zeros_like(wj))
        else:
            rows.append(torch.autograd.grad(total, wj)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_repulsion_against_loop_and_autograd(iters: int) -> None:
    w2, u, c = _layer()
    tau = 0.5
    k = stein.axial_kernel(u, tau=tau)
    _, m_in = stein.neighbour_masks(c, top_m=1, min_frac=0.3)
    ref = _repulsion_loop(w2, u, k, m_in, tau, iters)
    assert ref.abs().max() > 1e-3  # a non-trivial case
    got = stein.repulsion(w2, u, k, m_in, tau=tau, iters=iters)
    torch.testing.assert_close(got, ref)
    v = stein.repulsion_weights(k, m_in)
    torch.testing.assert_close(stein.repulsion_autograd(w2, u, v, tau=tau, iters=iters), ref)
    for chunk in (1, 4):
        left, right = stein.repulsion_factors(w2, u, v, tau=tau, iters=iters, expert_chunk=chunk)
        assert left.shape == (6, 8, 2 * iters) and right.shape == (6, 2 * iters, 5)
        torch.testing.assert_close(left @ right, ref)


def test_repulsion_finite_differences() -> None:
    w2, u, c = _layer(seed=20)
    tau, iters = 0.4, 2
    k = stein.axial_kernel(u, tau=tau)
    _, m_in = stein.neighbour_masks(c, top_m=1, min_frac=0.3)
    v = stein.repulsion_weights(k, m_in)
    phi = stein.repulsion(w2, u, k, m_in, tau=tau, iters=iters)
    gen = torch.Generator().manual_seed(21)

    def objective(j: int, wj: torch.Tensor) -> float:
        x = stein.power_iteration(wj, u[j], iters=iters)
        cos = u @ x
        return float((v[j] * torch.exp(-(1 - cos * cos) / tau)).sum())

    h = 1e-6
    for j in range(6):
        for _ in range(3):
            direction = torch.randn(8, 5, generator=gen, dtype=F64)
            fd = (objective(j, w2[j] + h * direction) - objective(j, w2[j] - h * direction)) / (
                2 * h
            )
            assert float((phi[j] * direction).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_repulsion_inactive_rows_zero_and_lowers_kernel() -> None:
    w2, u, c = _layer(seed=22)
    tau = 0.5
    k = stein.axial_kernel(u, tau=tau)
    _, m_in = stein.neighbour_masks(c, top_m=1, min_frac=0.3)
    active = c.diagonal() > 0
    phi = stein.repulsion(w2, u, k, m_in, tau=tau, iters=2, active=active)
    assert torch.equal(phi[5], torch.zeros_like(phi[5]))
    # descending along φ_rep lowers each expert's weighted kernel to its inactive neighbours
    v = stein.repulsion_weights(k, m_in, active=active)

    def weighted(w: torch.Tensor) -> torch.Tensor:
        x = stein.power_iteration(w, u, iters=2)
        cos = x @ u.T
        return (v * torch.exp(-(1 - cos * cos) / tau)).sum(-1)

    before, after = weighted(w2), weighted(w2 - 1e-3 * phi)
    assert torch.all(after[:5] < before[:5])


def test_repulsion_expert_parallel_rows_and_tensor_parallel_shards() -> None:
    w2, u, c = _layer(f=6, seed=23)
    k = stein.axial_kernel(u, tau=0.5)
    _, m_in = stein.neighbour_masks(c, top_m=1, min_frac=0.3)
    v = stein.repulsion_weights(k, m_in)
    full_l, full_r = stein.repulsion_factors(w2, u, v, tau=0.5, iters=2)
    full = full_l @ full_r
    # EP: this rank owns experts 2..4, knows everyone's prototypes
    part_l, part_r = stein.repulsion_factors(w2[2:5], u[2:5], v[2:5], tau=0.5, iters=2, u_all=u)
    torch.testing.assert_close(part_l @ part_r, full[2:5])
    # ETP: W2 split along f over 2 shards, computed in lockstep as a leading dimension
    shards = torch.stack(w2.chunk(2, dim=-1))  # [2, E, d, f/2]

    def allreduce(s: torch.Tensor) -> torch.Tensor:
        return s.sum(0, keepdim=True).expand_as(s)

    sl, sr = stein.repulsion_factors(
        shards, u.expand(2, 6, 8), v, tau=0.5, iters=2, u_all=u, allreduce=allreduce
    )
    torch.testing.assert_close(torch.cat([sl[0] @ sr[0], sl[1] @ sr[1]], dim=-1), full)


# ------------------------------------------------------------------ §8 transport


def test_transport_combines_attraction_and_repulsion() -> None:
    w2, u, c = _layer(seed=24)
    gen = torch.Generator().manual_seed(25)
    g1 = torch.randn(6, 10, 8, generator=gen, dtype=F64)  # fc1 [E, 2f, d]
    g2 = torch.randn(6, 8, 5, generator=gen, dtype=F64)  # fc2 [E, d, f]
    tau, alpha = 0.5, 0.3
    outs, metrics = stein.transport(
        [g1, g2],
        w2,
        u,
        c,
        w2_index=1,
        tau=tau,
        alpha=alpha,
        top_m=2,
        min_frac=0.1,
        iters=2,
        attraction_norm=True,
    )
    k = stein.axial_kernel(u, tau=tau)
    m_co, m_in = stein.neighbour_masks(c, top_m=2, min_frac=0.1)
    rep = _repulsion_loop(w2, u, k, m_in, tau, 2)
    att1, att2 = _attraction_loop(g1, k, m_co), _attraction_loop(g2, k, m_co)
    torch.testing.assert_close(outs[0][:5], att1[:5])
    torch.testing.assert_close(outs[1][:5], att2[:5] + alpha * rep[:5])
    assert torch.equal(outs[0][5], g1[5]) and torch.equal(outs[1][5], g2[5])  # inactive: g_j
    torch.testing.assert_close(metrics["stein/repulsion_norm"], rep[:5].norm())
    att_norm = torch.cat([att1.flatten(), att2.flatten()]).norm()
    torch.testing.assert_close(
        metrics["stein/attraction_norm"].double(), att_norm, rtol=1e-6, atol=0
    )
    assert float(metrics["stein/active_frac"]) == pytest.approx(5 / 6)
    # row tiles of the W2 output, preallocated strided outputs: same result
    buf = torch.empty(6, 10 * 8 + 8 * 5, dtype=F64)
    o1, o2 = buf[:, :80].view(6, 10, 8), buf[:, 80:].view(6, 8, 5)
    tiled, _ = stein.transport(
        [g1, g2],
        w2,
        u,
        c,
        w2_index=1,
        tau=tau,
        alpha=alpha,
        top_m=2,
        min_frac=0.1,
        iters=2,
        out=[o1, o2],
        tile_rows=3,
    )
    assert tiled[0].data_ptr() == o1.data_ptr() and tiled[1].data_ptr() == o2.data_ptr()
    torch.testing.assert_close(tiled[0], outs[0])
    torch.testing.assert_close(tiled[1], outs[1])
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())


# ------------------------------------------------------------------ SVGD from the same pieces


def test_kernel_gradient_matches_rbf_formula() -> None:
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(26), dtype=F64)
    v = torch.rand(5, 5, generator=torch.Generator().manual_seed(27), dtype=F64)
    h = 0.8
    got = oracles.kernel_gradient(x, v, lambda y, xx: oracles.rbf_kernel(y, xx, h=h))
    ref = torch.zeros_like(x)
    for j in range(5):
        for i in range(5):
            kji = math.exp(-float((x[j] - x[i]).square().sum()) / h)
            ref[j] += v[j, i] * kji * (-2 / h) * (x[j] - x[i])
    torch.testing.assert_close(got, ref)


def test_svgd_matches_gaussian_mixture_moments() -> None:
    """SVGD built from `attraction` + `kernel_gradient` fits a 1-D two-component mixture."""
    weights = torch.tensor([0.3, 0.7], dtype=F64)
    means = torch.tensor([-2.0, 2.0], dtype=F64)
    sd = 1.0

    def grad_neg_log_p(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        comp = torch.log(weights) - 0.5 * ((x - means) / sd) ** 2  # [n, 2]
        (g,) = torch.autograd.grad(-torch.logsumexp(comp, -1).sum(), x)
        return g

    target_mean = float((weights * means).sum())  # 0.8
    target_var = float((weights * (sd**2 + means**2)).sum()) - target_mean**2  # 1 + 4 - 0.64
    start = -8.0 + 0.3 * torch.randn(100, 1, generator=torch.Generator().manual_seed(28), dtype=F64)
    assert abs(float(start.mean()) - target_mean) > 8  # a poor start
    x = start
    for _ in range(500):
        x = x - 0.2 * oracles.svgd_rbf_direction(x, grad_neg_log_p(x))
    assert float(x.mean()) == pytest.approx(target_mean, abs=0.1)
    assert float(x.var()) == pytest.approx(target_var, rel=0.05)
    # the repulsion is what keeps the spread: attraction alone collapses onto one mode
    x = start
    everyone = torch.ones(100, 100, dtype=torch.bool)
    for _ in range(200):
        k = oracles.rbf_kernel(x, x, h=oracles.median_bandwidth(x))
        x = x - 0.2 * stein.attraction(grad_neg_log_p(x), k, everyone)
    assert float(x.var()) < 0.01
