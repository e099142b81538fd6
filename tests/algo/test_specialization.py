"""Expert specialisation losses (method §9) against explicit loops and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vp2o.algo import specialization as spec

F64 = torch.float64


def _ortho_loop(x: torch.Tensor, eps: float) -> float:
    """(1/(T·k)) Σ_t Σ_j Σ_{l≠j} ‖(⟨x_tj, x_tl⟩ / (⟨x_tl, x_tl⟩ + ε)) x_tl‖² (method §9)."""
    t_count, k, _ = x.shape
    total = 0.0
    for t in range(t_count):
        for j in range(k):
            for m in range(k):
                if m == j:
                    continue
                coef = float(x[t, j] @ x[t, m]) / (float(x[t, m] @ x[t, m]) + eps)
                total += float((coef * x[t, m]).square().sum())
    return total / (t_count * k)


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_orthogonality_against_double_loop(eps: float) -> None:
    x = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    x[2, 1] = 0.0  # a zero output: no NaN
    assert float(spec.orthogonality_loss(x, eps=eps)) == pytest.approx(_ortho_loop(x, eps))


def test_orthogonality_zero_for_orthogonal_outputs_and_token_layout() -> None:
    t_count, k, d = 6, 3, 8
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(t_count):
        q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=F64))
        rows.append(q.T * torch.rand(k, 1, generator=gen, dtype=F64).add(0.5))  # k orthogonal
    x = torch.stack(rows)  # [T, k, d], token order
    assert float(spec.orthogonality_loss(x)) == pytest.approx(0.0, abs=1e-20)
    # the reference code's bug: rows grouped by expert pair different tokens' outputs
    grouped = x.transpose(0, 1).reshape(t_count, k, d)
    assert float(spec.orthogonality_loss(grouped)) > 1e-2


def test_orthogonality_token_permutation_permutes_per_token_terms_only() -> None:
    x = torch.randn(9, 4, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    per_token = spec.orthogonality_per_token(x)
    torch.testing.assert_close(spec.orthogonality_per_token(x[perm]), per_token[perm])
    torch.testing.assert_close(spec.orthogonality_loss(x[perm]), spec.orthogonality_loss(x))
    # each row is one token: changing token 4 changes only term 4
    y = x.clone()
    y[4] = torch.randn(4, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    changed = spec.orthogonality_per_token(y) != per_token
    assert changed.tolist() == [i == 4 for i in range(9)]


def test_orthogonality_gradient_and_empty_batch() -> None:
    x = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: spec.orthogonality_loss(t), (x,))
    assert float(spec.orthogonality_loss(torch.zeros(0, 2, 4))) == 0.0


def test_routing_variance_against_numpy_and_gradient_sign() -> None:
    gen = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(11, 6, generator=gen, dtype=F64), -1)
    ids = probs.topk(2, dim=-1).indices
    routing = torch.zeros(11, 6, dtype=torch.bool).scatter_(1, ids, True)
    s = spec.topk_scores(probs, routing)
    torch.testing.assert_close(s.sum(-1), torch.ones(11, dtype=F64))
    assert torch.all(s[~routing] == 0)
    ref = -np.mean(np.var(s.numpy(), axis=0))  # population variance over tokens, mean over experts
    assert float(spec.routing_variance_loss(s)) == pytest.approx(ref)

    leaf = s.clone().requires_grad_(True)
    loss = spec.routing_variance_loss(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    centred = s - s.mean(0, keepdim=True)
    torch.testing.assert_close(grad, -2 * centred / (11 * 6))
    stepped = s - 0.5 * grad  # a descent step on L_v raises every expert's variance
    assert torch.all(stepped.var(0) > s.var(0))


def test_routing_variance_empty_batch() -> None:
    assert float(spec.routing_variance_loss(torch.zeros(0, 4))) == 0.0


def test_scale_free_orthogonality_against_loop_and_scale_invariance():
    """vp2o.ortho_normalize: squared cosines of each ordered pair, divided by k, token-averaged."""
    import torch

    from vp2o.algo import specialization

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
    want = 0.0
    for t in range(6):
        for j in range(3):
            for m in range(3):
                if j != m:
                    a, b = x[t, j], x[t, m]
                    want += float((a @ b) ** 2 / ((a @ a) * (b @ b)))
    want /= 6 * 3
    got = specialization.orthogonality_loss(x, eps=0.0, normalize=True)
    assert abs(float(got) - want) < 1e-12
    scaled = specialization.orthogonality_loss(37.0 * x, eps=0.0, normalize=True)
    assert abs(float(scaled) - want) < 1e-12
    raw = specialization.orthogonality_loss(37.0 * x, eps=0.0)
    assert float(raw) > 100 * want  # the method's form grows with the outputs' scale


@pytest.mark.parametrize("normalize", [False, True], ids=["method", "scale_free"])
def test_orthogonality_with_row_scales_equals_loss_of_unscaled_rows(normalize):
    """``scale=s`` gives the loss of x / s (the MoE layer's gate-weighted outputs and gates), with
    the gradient of the unscaled rows, and a zero gradient to s when x = s * x~ (gate paths
    cancel: the router gets nothing)."""
    gen = torch.Generator().manual_seed(9)
    raw = torch.randn(7, 3, 5, generator=gen, dtype=torch.float64)
    gates = torch.rand(7, 3, generator=gen, dtype=torch.float64) + 0.05
    eps = 1e-3  # large enough that a mis-scaled eps shows
    want = spec.orthogonality_loss(raw, eps, normalize=normalize)
    scaled = raw * gates.unsqueeze(-1)
    got = spec.orthogonality_loss(scaled, eps, normalize=normalize, scale=gates)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    # Gradients through x = g * x~ with both x~ and g as leaves.
    x_leaf = raw.clone().requires_grad_(True)
    g_leaf = gates.clone().requires_grad_(True)
    spec.orthogonality_loss(
        x_leaf * g_leaf.unsqueeze(-1), eps, normalize=normalize, scale=g_leaf
    ).backward()
    ref_leaf = raw.clone().requires_grad_(True)
    spec.orthogonality_loss(ref_leaf, eps, normalize=normalize).backward()
    torch.testing.assert_close(x_leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-14)
    assert float(g_leaf.grad.abs().max()) < 1e-12 * float(ref_leaf.grad.abs().max()) + 1e-15


def test_token_gram_backward_against_finite_differences():
    """The Gram's hand-written backward (dX = (dG + dG^T) X), with an asymmetric upstream."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: (spec._TokenGram.apply(t) * weights).sum(), (x,))


def test_routing_variance_fused_backward_against_autograd_and_finite_differences():
    """The closed-form backward (with the row renormalisation) against plain autograd of the
    formula, and gradcheck; zero rows (clamped sums) included."""
    gen = torch.Generator().manual_seed(2)
    p = torch.rand(9, 5, generator=gen, dtype=torch.float64)
    p[p < 0.5] = 0.0
    p[3] = 0.0  # a row of zeros: the clamp holds
    leaf = p.clone().requires_grad_(True)
    spec.routing_variance_loss(leaf, renormalize=True).backward()
    ref = p.clone().requires_grad_(True)
    s = ref / ref.sum(-1, keepdim=True).clamp_min(1e-20)
    (-(s - s.mean(0, keepdim=True)).square().mean()).backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-12, atol=1e-15)
    q = torch.rand(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: spec.routing_variance_loss(t, renormalize=True), (q,))
    assert torch.autograd.gradcheck(lambda t: spec.routing_variance_loss(t), (q,))


@pytest.mark.parametrize("with_scale", [False, True], ids=["plain", "scaled"])
def test_scale_free_orthogonality_fused_backward(with_scale):
    """The one-node scale-free loss against autograd of the per-token form, and gradcheck."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    scale = (torch.rand(6, 3, generator=gen, dtype=torch.float64) + 0.2) if with_scale else None
    eps = 1e-2
    leaves = [x.clone().requires_grad_(True)] + (
        [scale.clone().requires_grad_(True)] if with_scale else []
    )
    got = spec.orthogonality_loss(leaves[0], eps, normalize=True,
                                  scale=leaves[1] if with_scale else None)
    got.backward()
    refs = [x.clone().requires_grad_(True)] + (
        [scale.clone().requires_grad_(True)] if with_scale else []
    )
    want = spec.orthogonality_per_token(refs[0], eps=eps, normalize=True,
                                        scale=refs[1] if with_scale else None).mean()
    want.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    for a, b in zip(leaves, refs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    if with_scale:
        fn = lambda a, s: spec.orthogonality_loss(a, eps, normalize=True, scale=s)  # noqa: E731
        assert torch.autograd.gradcheck(fn, tuple(r.detach().requires_grad_(True) for r in refs))
    else:
        fn = lambda a: spec.orthogonality_loss(a, eps, normalize=True)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),))


def _rows_in_expert_order(t_count: int, k: int, d: int, seed: int, dtype=torch.float64):
    """Rows of t_count tokens x k experts held in a shuffled (expert-grouped-like) order."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(t_count * k, d, generator=gen, dtype=dtype)
    dest = torch.randperm(t_count * k, generator=gen)  # token-major position of row r
    order = torch.empty_like(dest)
    order[dest] = torch.arange(t_count * k)  # row of token-major position p
    return rows, order, dest


def test_token_gram_of_rows_in_another_order_equals_gram_of_the_gathered_rows():
    """`token_gram` (rows read through ``order``, backward through the known inverse ``dest``)
    against the Gram of the explicitly gathered [T, k, d] rows: values, gradients, gradcheck."""
    rows, order, dest = _rows_in_expert_order(5, 3, 4, seed=1)
    weights = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    leaf = rows.clone().requires_grad_(True)
    got = spec.token_gram(leaf, order, dest, 3)
    ref_leaf = rows.clone().requires_grad_(True)
    want = spec._TokenGram.apply(ref_leaf[order].view(5, 3, 4))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda r: (spec.token_gram(r, order, dest, 3) * weights).sum(),
        (rows.clone().requires_grad_(True),),
    )


def test_token_gram_with_several_graphs_alive():
    """Two graphs alive at once (forward A, forward B of another size, backward A, backward B)
    and a float32 call in between: each gradient equals its own reference (nothing one call
    keeps for its backward is shared with another)."""
    cases = [_rows_in_expert_order(6, 2, 8, seed=3), _rows_in_expert_order(3, 4, 5, seed=4)]
    leaves, losses, refs = [], [], []
    for (rows, order, dest), k in zip(cases, (2, 4), strict=True):
        leaf = rows.clone().requires_grad_(True)
        losses.append(spec.token_gram(leaf, order, dest, k).square().sum())
        leaves.append(leaf)
        ref = rows.clone().requires_grad_(True)
        spec._TokenGram.apply(ref[order].view(-1, k, rows.shape[1])).square().sum().backward()
        refs.append(ref.grad)
    rows32, order32, dest32 = _rows_in_expert_order(9, 2, 7, seed=5, dtype=torch.float32)
    spec.token_gram(rows32.requires_grad_(True), order32, dest32, 2).sum().backward()
    for i in (0, 1):
        losses[i].backward()
        torch.testing.assert_close(leaves[i].grad, refs[i], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("normalize", [False, True], ids=["method", "scale_free"])
def test_orthogonality_loss_from_gram_equals_the_loss_of_the_rows(normalize):
    """The MoE layer's path (Gram of rows in another order, gates as row scales) against
    `orthogonality_loss` of the gathered rows: value and gradients to rows and scales."""
    rows, order, dest = _rows_in_expert_order(6, 2, 5, seed=6)
    gates = torch.rand(6, 2, generator=torch.Generator().manual_seed(7), dtype=F64) + 0.1
    leaf, g_leaf = rows.clone().requires_grad_(True), gates.clone().requires_grad_(True)
    got = spec.orthogonality_loss_from_gram(
        spec.token_gram(leaf, order, dest, 2), 1e-3, normalize=normalize, scale=g_leaf
    )
    ref, g_ref = rows.clone().requires_grad_(True), gates.clone().requires_grad_(True)
    want = spec.orthogonality_loss(ref[order].view(6, 2, 5), 1e-3, normalize=normalize,
                                   scale=g_ref)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_leaf.grad, g_ref.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("renormalize", [False, True])
def test_routing_variance_with_a_row_mask_equals_the_loss_of_the_kept_rows(renormalize):
    """A row mask gives the loss of the kept rows alone (value and gradient; masked rows get a
    zero gradient), and an all-False mask gives 0, not NaN."""
    gen = torch.Generator().manual_seed(12)
    p = torch.rand(9, 5, generator=gen, dtype=F64) * (torch.rand(9, 5, generator=gen) > 0.4)
    p[:, 0] += 0.1  # no all-zero row
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    leaf, kept = p.clone().requires_grad_(True), p[mask].clone().requires_grad_(True)
    got = spec.routing_variance_loss(leaf, renormalize=renormalize, mask=mask)
    want = spec.routing_variance_loss(kept, renormalize=renormalize)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(leaf.grad[mask], kept.grad, rtol=1e-10, atol=1e-15)
    assert float(leaf.grad[~mask].abs().max()) == 0.0
    assert torch.autograd.gradcheck(
        lambda t: spec.routing_variance_loss(t, renormalize=renormalize, mask=mask),
        (p.clone().requires_grad_(True),),
    )
    none = spec.routing_variance_loss(p, renormalize=renormalize, mask=torch.zeros(9, dtype=bool))
    assert float(none) == 0.0


@pytest.mark.parametrize("normalize", [False, True], ids=["method", "scale_free"])
def test_orthogonality_with_a_token_mask_equals_the_loss_of_the_kept_tokens(normalize):
    """A token mask gives the loss of the kept tokens alone, value and gradients to x and the
    row scales, zero gradient at masked tokens; an all-False mask gives 0."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(8, 3, 4, generator=gen, dtype=F64)
    s = torch.rand(8, 3, generator=gen, dtype=F64) + 0.2
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    x_leaf, s_leaf = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = spec.orthogonality_loss_from_gram(
        spec._TokenGram.apply(x_leaf), 1e-3, normalize=normalize, scale=s_leaf, mask=mask
    )
    x_kept, s_kept = x[mask].clone().requires_grad_(True), s[mask].clone().requires_grad_(True)
    want = spec.orthogonality_loss(x_kept, 1e-3, normalize=normalize, scale=s_kept)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(x_leaf.grad[mask], x_kept.grad, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(s_leaf.grad[mask], s_kept.grad, rtol=1e-10, atol=1e-15)
    assert float(x_leaf.grad[~mask].abs().max()) == 0.0
    none = spec.orthogonality_loss_from_gram(
        spec._TokenGram.apply(x), normalize=normalize, mask=torch.zeros(8, dtype=torch.bool)
    )
    assert float(none) == 0.0
    # A masked-out token with zero rows and zero scales (a degenerate pad) changes nothing.
    x_pad, s_pad = x.clone(), s.clone()
    x_pad[2], s_pad[2] = 0.0, 0.0
    leaf = x_pad.clone().requires_grad_(True)
    padded = spec.orthogonality_loss_from_gram(
        spec._TokenGram.apply(leaf), 0.0, normalize=normalize, scale=s_pad, mask=mask
    )
    assert torch.isfinite(padded)
    if normalize:  # the fused node's gradient is finite too
        padded.backward()
        assert bool(torch.isfinite(leaf.grad).all())
