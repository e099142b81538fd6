"""The signed angular kernel (`vp2o.kernel = signed`) and the attraction switch (`vp2o.attraction`)
of the Stein transport, against loops and autograd written from the formulas, and float64
finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vp2o.algo import stein

F64 = torch.float64


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _layer(e: int = 6, d: int = 8, f: int = 5, seed: int = 40):
    """W2 [E, d, f], converged prototypes u [E, d], a C with expert 5 inactive."""
    gen = torch.Generator().manual_seed(seed)
    w2 = torch.randn(e, d, f, generator=gen, dtype=F64)
    u = stein.power_iteration(w2, torch.randn(e, d, generator=gen, dtype=F64), iters=3)
    routing = torch.zeros(300, e, dtype=torch.bool)
    scores = torch.rand(300, e - 1, generator=gen)
    routing[:, : e - 1] = torch.zeros_like(scores, dtype=torch.bool).scatter_(
        1, scores.topk(2, -1).indices, True
    )
    return w2, u, stein.coactivation(routing).double()


def _signed(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """k(a, b) = exp(−(1 − cos θ)/τ), θ the angle between a and b (the kernel's definition)."""
    cos = (a @ b) / (a.norm() * b.norm())
    return torch.exp(-(1 - cos) / tau)


def _repulsion_loop(w2, u, v, tau, iters, kern):
    """φ_rep(j) = ∇_{W2_j} Σ_i v_ji k(u_i, u'_j(W2_j)), one expert at a time (method §7)."""
    rows = []
    for j in range(w2.shape[0]):
        wj = w2[j].clone().requires_grad_(True)
        x = u[j].clone()
        for _ in range(iters):
            x = wj @ (wj.T @ x)
            x = x / x.norm()
        total = sum(v[j, i] * kern(u[i], x, tau) for i in range(w2.shape[0]))
        rows.append(torch.autograd.grad(total, wj)[0])
    return torch.stack(rows)


def test_signed_kernel_values_and_angle_only() -> None:
    gen = torch.Generator().manual_seed(41)
    u = _unit(torch.randn(5, 7, generator=gen, dtype=F64))
    tau = 0.7
    k = stein.signed_kernel(u, tau=tau)
    for i in range(5):
        for j in range(5):
            want = 1.0 if i == j else float(_signed(u[i], u[j], tau))
            assert float(k[i, j]) == pytest.approx(want, rel=1e-12)
    assert torch.equal(k.diagonal(), torch.ones(5, dtype=F64))
    torch.testing.assert_close(k, k.T)
    # a function of the angle only: a common rotation changes nothing ...
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=gen, dtype=F64))
    torch.testing.assert_close(stein.signed_kernel(u @ q.T, tau=tau), k)
    # ... a sign flip does (the axial kernel ignores it)
    flipped = u.clone()
    flipped[0] = -flipped[0]
    assert not torch.allclose(stein.signed_kernel(flipped, tau=tau)[0, 1:], k[0, 1:])
    torch.testing.assert_close(stein.axial_kernel(flipped, tau=tau), stein.axial_kernel(u, tau))
    # τ = 1/log E: orthogonal 1/E (as the axial kernel), opposite 1/E²
    e = 8
    basis = torch.cat([torch.eye(4, dtype=F64), -torch.eye(4, dtype=F64)])  # [8, 4]
    ks = stein.prototype_kernel(basis, tau=stein.temperature(e), kernel="signed")
    assert float(ks[0, 1]) == pytest.approx(1 / e, rel=1e-12)
    assert float(ks[0, 4]) == pytest.approx(1 / e**2, rel=1e-12)
    with pytest.raises(ValueError, match="kernel must be one of axial, signed"):
        stein.prototype_kernel(u, tau=1.0, kernel="gauss")


def test_signed_kernel_is_positive_definite() -> None:
    # The Gaussian kernel of the chordal distance: Gram matrices are PSD (SVGD's requirement).
    gen = torch.Generator().manual_seed(42)
    for tau in (0.05, 0.3, 2.0):
        u = _unit(torch.randn(40, 3, generator=gen, dtype=F64))
        assert float(torch.linalg.eigvalsh(stein.signed_kernel(u, tau=tau)).min()) > -1e-10


def test_median_temperature_signed_against_numpy() -> None:
    gen = torch.Generator().manual_seed(43)
    u = _unit(torch.randn(6, 5, generator=gen, dtype=F64))
    un = u.numpy()
    dist = [1 - un[i] @ un[j] for i in range(6) for j in range(6) if i != j]
    want = 1.5 * float(np.median(dist)) / math.log(6)
    got = stein.median_temperature(u, tau0=1.5, kernel="signed")
    assert float(got) == pytest.approx(want, rel=1e-9)


def _weights_loop(k, mask, active, *, inactive_row):
    """§6 / §7 weights written per entry: row j is M[j, i] k_ji / Σ_l M[j, l] k_jl for an active
    expert j; an inactive one gets ``inactive_row(j)`` (attraction: the unit row; repulsion:
    zeros, §8)."""
    e = k.shape[0]
    out = torch.zeros(e, e, dtype=k.dtype)
    for j in range(e):
        if not bool(active[j]):
            out[j] = inactive_row(j)
            continue
        total = sum(float(k[j, m]) for m in range(e) if bool(mask[j, m]))
        for i in range(e):
            if bool(mask[j, i]):
                out[j, i] = float(k[j, i]) / max(total, 1e-12)
    return out


def _unit_row(e):
    return lambda j: torch.eye(e, dtype=F64)[j]


def _zero_row(e):
    return lambda j: torch.zeros(e, dtype=F64)


@pytest.mark.parametrize("iters", [1, 2])
def test_signed_repulsion_against_loop_autograd_and_finite_differences(iters: int) -> None:
    w2, u, c = _layer()
    tau = 0.5
    k = stein.signed_kernel(u, tau=tau)
    _, m_in = stein.neighbour_masks(c, top_m=1, min_frac=0.3)
    v = _weights_loop(k, m_in, c.diagonal() > 0, inactive_row=_zero_row(6))
    torch.testing.assert_close(stein.repulsion_weights(k, m_in, active=c.diagonal() > 0), v)
    ref = _repulsion_loop(w2, u, v, tau, iters, _signed)
    assert ref[:5].abs().max() > 1e-3 and torch.equal(ref[5], torch.zeros_like(ref[5]))
    left, right = stein.repulsion_factors(w2, u, v, tau=tau, iters=iters, kernel="signed")
    torch.testing.assert_close(left @ right, ref)
    auto = stein.repulsion_autograd(w2, u, v, tau=tau, iters=iters, kernel="signed")
    torch.testing.assert_close(auto, ref)
    phi = stein.repulsion(w2, u, k, m_in, tau, iters, active=c.diagonal() > 0, kernel="signed")
    torch.testing.assert_close(phi, ref)
    # the axial factors are a different field
    assert not torch.allclose(stein.repulsion_autograd(w2, u, v, tau=tau, iters=iters), ref)

    def objective(j: int, wj: torch.Tensor) -> float:
        x = stein.power_iteration(wj, u[j], iters=iters)
        return float((v[j] * torch.exp(-(1 - u @ x) / tau)).sum())

    gen, h = torch.Generator().manual_seed(44), 1e-6
    for j in range(5):
        direction = torch.randn(8, 5, generator=gen, dtype=F64)
        fd = (objective(j, w2[j] + h * direction) - objective(j, w2[j] - h * direction)) / (2 * h)
        assert float((phi[j] * direction).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_signed_repulsion_does_not_vanish_for_orthogonal_prototypes() -> None:
    # Expert 0's W2 has rank one along e_0; expert 1's prototype is e_1, orthogonal to it: the
    # axial kernel's slope 2ck/τ is 0 there, the signed kernel's k/τ is not.
    d, f = 4, 3
    w2 = torch.zeros(2, d, f, dtype=F64)
    w2[0, 0, 0], w2[0, 1, 1] = 2.0, 0.5  # top left singular vector e_0, a second direction e_1
    w2[1, 1, 0] = 1.0
    u = torch.eye(d, dtype=F64)[:2]  # u_0 = e_0, u_1 = e_1
    v = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    axial = stein.repulsion_autograd(w2, u, v, tau=0.5, iters=2)
    signed = stein.repulsion_autograd(w2, u, v, tau=0.5, iters=2, kernel="signed")
    assert float(axial[0].norm()) < 1e-12
    assert float(signed[0].norm()) > 0.1
    # descending along it lowers expert 0's kernel to expert 1 (it moves away from u_1)
    def k01(w: torch.Tensor) -> float:
        return float(_signed(u[1], stein.power_iteration(w, u[0], iters=2), 0.5))

    assert k01(w2[0] - 1e-2 * signed[0]) < k01(w2[0])


def _transport(grads, w2, u, c, **kw):
    args = dict(w2_index=1, tau=0.5, alpha=0.3, top_m=2, min_frac=0.1, iters=2)
    return stein.transport(grads, w2, u, c, **{**args, **kw})


def test_transport_signed_kernel_and_without_attraction() -> None:
    w2, u, c = _layer(seed=45)
    gen = torch.Generator().manual_seed(46)
    g1 = torch.randn(6, 10, 8, generator=gen, dtype=F64)  # fc1 [E, 2f, d]
    g2 = torch.randn(6, 8, 5, generator=gen, dtype=F64)  # fc2 [E, d, f]
    active = c.diagonal() > 0
    k = stein.signed_kernel(u, tau=0.5)
    m_co, m_in = stein.neighbour_masks(c, top_m=2, min_frac=0.1)
    a = _weights_loop(k, m_co, active, inactive_row=_unit_row(6))
    rep = _repulsion_loop(w2, u, _weights_loop(k, m_in, active, inactive_row=_zero_row(6)), 0.5,
                          2, _signed)
    outs, metrics = _transport([g1, g2], w2, u, c, kernel="signed", attraction_norm=True)
    torch.testing.assert_close(outs[0], (a @ g1.reshape(6, -1)).view_as(g1))
    torch.testing.assert_close(outs[1], (a @ g2.reshape(6, -1)).view_as(g2) + 0.3 * rep)
    torch.testing.assert_close(metrics["stein/kernel_offdiag_mean"],
                               k[~torch.eye(6, dtype=torch.bool)].mean())
    # attraction off: g + α φ_rep; inactive expert 5 still passes unchanged
    outs, _ = _transport([g1, g2], w2, u, c, kernel="signed", attract=False)
    assert torch.equal(outs[0], g1)
    torch.testing.assert_close(outs[1], g2 + 0.3 * rep)
    assert torch.equal(outs[1][5], g2[5])
    # attraction off and α = 0: the identity, bit for bit
    outs, _ = _transport([g1, g2], w2, u, c, attract=False, alpha=0.0)
    assert torch.equal(outs[0], g1) and torch.equal(outs[1], g2)
