"""Expert specialisation losses of Guo et al. 2026 (arXiv 2505.22323, eq 5-7), method §9.

Glossary: T tokens of the local micro-batch, k top-k, d model width, E experts.

Choices, said plainly:

- The orthogonality loss is averaged over tokens (`1/(T·k)`), not summed as in the paper, so its
  weight does not depend on the batch size (§9).
- `x` must be in token order: row t of `x` holds token t's k selected experts' raw outputs (before
  the gate weighting). The public reference code groups rows by expert instead, which pairs
  outputs of different tokens; `orthogonality_per_token` lets tests check the layout.
- The Gram matrices are formed in the input dtype (one batched matmul) and reduced in float32.
- An empty micro-batch (T = 0) gives a loss of 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "orthogonality_loss",
    "orthogonality_loss_from_gram",
    "orthogonality_per_token",
    "routing_variance_loss",
    "per_token_gram",
    "token_gram",
    "token_major_rows",
    "topk_scores",
]


class _TokenGram(torch.autograd.Function):
    """`G_t = X_t X_tᵀ` per token, [T, k, d] -> [T, k, k], with the backward `dX = (dG + dGᵀ) X`.

    One batched product each way: autograd's own backward of `bmm(x, x.mT)` forms the second
    operand's gradient as [T, d, k] products, which the CPU runs ~10x slower than the forward.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.bmm(x, x.mT)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.bmm(grad + grad.mT, x)


class _PermuteRows(torch.autograd.Function):
    """`rows[order]` for a permutation whose inverse `dest` is known: the backward is a gather by
    `dest` instead of autograd's accumulating index_put (serial on the CPU)."""

    @staticmethod
    def forward(ctx, rows: Tensor, order: Tensor, dest: Tensor) -> Tensor:
        ctx.save_for_backward(dest)
        return rows.index_select(0, order)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (dest,) = ctx.saved_tensors
        return grad.index_select(0, dest), None, None


def token_major_rows(rows: Tensor, order: Tensor, dest: Tensor, k: int) -> Tensor:
    """Rows held in another order, read token-major: [T·k, d] -> `rows[order]` as [T, k, d].

    `order[t·k + j]` is the row of token t's j-th selected expert and `dest` its inverse
    (`order[dest] = arange`); the backward gathers by `dest`. The MoE layer's rows come grouped
    by expert (vp2o/mcore/vp2o_moe.py).
    """
    return _PermuteRows.apply(rows, order, dest).view(-1, k, rows.shape[-1])


def per_token_gram(x: Tensor) -> Tensor:
    """`G_t = X_t X_tᵀ` per token (§9), [T, k, d] -> [T, k, k], in the input dtype."""
    return _TokenGram.apply(x)


def token_gram(rows: Tensor, order: Tensor, dest: Tensor, k: int) -> Tensor:
    """Per-token Gram matrices of rows held in another order (§9), [T·k, d] -> [T, k, k]:
    `per_token_gram(token_major_rows(rows, order, dest, k))`."""
    return _TokenGram.apply(token_major_rows(rows, order, dest, k))


def orthogonality_per_token(
    x: Tensor, *, eps: float = 1e-6, normalize: bool = False, scale: Tensor | None = None
) -> Tensor:
    """Each token's orthogonality term divided by k (§9).

    `ℓ_t = (1/k) Σ_{j≠l} G_t[j,l]² q_l / (q_l + ε)²`, `G_t = X_t X_tᵀ` (k×k), `q = diag(G_t)`: the
    squared norm of the projection of output j on output l, summed over ordered pairs.

    With ``normalize`` (vp2o's default, ``vp2o.ortho_normalize``; a departure from the method, see
    docs/algorithm.md) the projection of the unit vector `x_j/‖x_j‖` is used instead:
    `G_t[j,l]² / ((q_j + ε)(q_l + ε))`, the squared cosine, so the loss lies in [0, k−1] whatever
    the scale of the expert outputs.

    ``scale`` gives the loss of `x̃ = x / scale` (row-wise) without forming `x̃`: with `x = s x̃`,
    `G̃_jl = G_jl / (s_j s_l)` and `q̃ = q / s²`, so the terms are exact rewrites in [T, k] scalars
    (e.g. `G_jl² / ((q_j + ε s_j²)(q_l + ε s_l²))` for the normalised form). The MoE layer passes
    gate-weighted expert outputs and their gates (vp2o/mcore/vp2o_moe.py).

    Args:
        x: Expert outputs in token order, [T, k, d] (x[t, j] is token t's j-th selected expert).
        eps: ε.
        normalize: Scale-free (squared-cosine) form.
        scale: Optional nonzero row scales s, [T, k]: the loss is that of `x / s`.

    Returns:
        ℓ, [T], float32 (float64 for float64 input).
    """
    return _per_token_terms(_TokenGram.apply(x), eps=eps, normalize=normalize, scale=scale)


def _per_token_terms(
    gram: Tensor, *, eps: float, normalize: bool, scale: Tensor | None
) -> Tensor:
    """`orthogonality_per_token` from the Gram matrices [T, k, k] -> [T]."""
    k = gram.shape[-1]
    dt = torch.promote_types(gram.dtype, torch.float32)
    gram = gram.to(dt)  # [T, k, k]
    q = gram.diagonal(dim1=-2, dim2=-1)  # [T, k]
    s2 = None if scale is None else scale.to(dt).square()  # [T, k]
    eps_q = eps if s2 is None else eps * s2  # ε in the units of q
    off = ~torch.eye(k, dtype=torch.bool, device=gram.device)
    if normalize:
        inv = 1.0 / (q + eps_q)  # [T, k]
        terms = gram.square() * inv.unsqueeze(-1) * inv.unsqueeze(-2) * off  # [T, k, k]
    else:
        col = q / (q + eps_q).square()  # [T, k], weight of column l
        terms = gram.square() * col.unsqueeze(-2) * off  # [T, k, k]
        if s2 is not None:
            terms = terms / s2.unsqueeze(-1)  # row j
    return terms.sum((-2, -1)) / k  # [T]


def orthogonality_loss(
    x: Tensor, eps: float = 1e-6, *, normalize: bool = False, scale: Tensor | None = None
) -> Tensor:
    """Orthogonality loss `L_o` (§9, Guo et al. eq 5-6), averaged over tokens.

    `L_o = (1/(T·k)) Σ_t Σ_{j∈S_t} Σ_{l∈S_t, l≠j} ‖(⟨x_tj, x_tl⟩ / (⟨x_tl, x_tl⟩ + ε)) x_tl‖²`.
    ``normalize``: the scale-free squared-cosine form (see `orthogonality_per_token`).

    Args:
        x: Raw expert outputs in token order, [T, k, d].
        eps: ε.
        normalize: Scale-free form.
        scale: Optional row scales, [T, k]: the loss of `x / scale` (see `orthogonality_per_token`).

    Returns:
        0-dim tensor (float32, or float64 for float64 input).
    """
    return orthogonality_loss_from_gram(
        _TokenGram.apply(x), eps, normalize=normalize, scale=scale
    )


def orthogonality_loss_from_gram(
    gram: Tensor,
    eps: float = 1e-6,
    *,
    normalize: bool = False,
    scale: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """`orthogonality_loss` from the per-token Gram matrices `G_t = X_t X_tᵀ`, [T, k, k]
    (`token_gram` for rows held in another order). Same arguments otherwise, and ``mask``:
    optional bool [T], the tokens that count (the mean is over them; padding tokens), without
    a data-dependent shape (no host sync on accelerators)."""
    if normalize and gram.shape[0] > 0:
        return _ScaleFreeOrthogonality.apply(gram, scale, mask, eps)
    per_token = _per_token_terms(gram, eps=eps, normalize=normalize, scale=scale)  # [T]
    if mask is None:
        return per_token.sum() / max(per_token.shape[0], 1)
    kept = torch.where(mask, per_token, 0.0)  # not per_token * mask: 0 * NaN at a degenerate pad
    return kept.sum() / mask.sum().clamp_min(1).to(per_token.dtype)


class _ScaleFreeOrthogonality(torch.autograd.Function):
    """The token-averaged scale-free loss `(1/(T·k)) Σ_t Σ_{j≠l} G_jl² / (e_j e_l)` in one node,
    from the Gram matrices G [T, k, k] (with a token mask: T counts the masked tokens, the sum
    runs over them).

    `e_j = q_j + ε s_j²` (s = 1 without ``scale``). Backward in closed form: with
    `c = 2·grad/(T·k)` (0 at masked-out tokens) and `W_jl = G_jl/(e_j e_l)` off the diagonal,
    `∂/∂G_jl = c W_jl` and `∂/∂e_j = h_j = −c (1/e_j) Σ_l W_jl G_jl`, so `dG = c W + diag(h)`
    (symmetric; the Gram node turns it into `dX = (dG + dGᵀ) X`), and `ds_j = 2 ε s_j h_j`. This
    runs in every MoE layer of every micro-batch; autograd of `_per_token_terms` takes ~20 small
    kernels.
    """

    @staticmethod
    def forward(
        ctx, gram: Tensor, scale: Tensor | None, mask: Tensor | None, eps: float
    ) -> Tensor:
        t, k = gram.shape[0], gram.shape[1]
        dt = torch.promote_types(gram.dtype, torch.float32)
        g = gram.to(dt)  # [T, k, k]
        e = g.diagonal(dim1=-2, dim2=-1) + (  # [T, k]
            eps if scale is None else eps * scale.to(dt).square()
        )
        inv = 1.0 / e
        if mask is not None:  # a masked-out token may be degenerate (e = 0): no 0 * inf there
            inv = torch.where(mask.unsqueeze(-1), inv, 0.0)
        w = g * inv.unsqueeze(-1) * inv.unsqueeze(-2)  # [T, k, k]
        w.diagonal(dim1=-2, dim2=-1).zero_()  # pairs j != l only
        # Token weights [T, 1, 1] / (T·k): the mask's tokens only, averaged over their count.
        if mask is None:
            weight = g.new_full((1, 1, 1), 1.0 / (t * k))
        else:
            m = mask.to(dt)
            weight = (m / (m.sum().clamp_min(1.0) * k)).view(t, 1, 1)
        row = (w * g).sum(-1)  # [T, k]: Σ_l W_jl G_jl
        ctx.save_for_backward(inv, w, row, scale, weight)
        ctx.eps = eps
        ctx.gram_dtype = gram.dtype
        return (row * weight.view(-1, 1)).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        inv, w, row, scale, weight = ctx.saved_tensors
        c = (2.0 * grad) * weight  # [T or 1, 1, 1]
        h = -c.squeeze(-1) * inv * row  # [T, k]: dL/de
        dgram = (c * w + torch.diag_embed(h)).to(ctx.gram_dtype)  # [T, k, k]
        dscale = None
        if scale is not None and ctx.needs_input_grad[1]:
            dscale = (h * (2.0 * ctx.eps) * scale.to(h.dtype)).to(scale.dtype)
        return dgram, dscale, None, None


def topk_scores(probs: Tensor, routing_map: Tensor) -> Tensor:
    """Routing scores after top-k selection, renormalised per token (§9).

    `s_tj = p_tj r_tj / Σ_l p_tl r_tl` (0 for unselected experts).

    Args:
        probs: Router probabilities, [T, E].
        routing_map: Selected experts, bool [T, E].

    Returns:
        s, [T, E], rows summing to 1.
    """
    s = probs * routing_map  # [T, E]
    return s / s.sum(-1, keepdim=True).clamp_min(1e-20)


class _RoutingVariance(torch.autograd.Function):
    """`−mean((s − s̄)²)` of row-renormalised scores `s = p / Σ_j p`, with a closed-form backward.

    Since `Σ_t (s_t − s̄) = 0`, `∂L/∂s = −2 (s − s̄) / (T·E)` (with a row mask m: T = Σ m, s̄ the
    masked mean, and the gradient times m); through the row renormalisation
    `∂L/∂p = (∂L/∂s − Σ_j s_j ∂L/∂s_j) / Σ_j p_j`. A handful of [T, E] kernels each way instead of
    autograd's ~15 (this runs in every MoE layer of every micro-batch).
    """

    @staticmethod
    def forward(ctx, probs: Tensor, renormalize: bool, mask: Tensor | None) -> Tensor:
        s = probs.to(torch.promote_types(probs.dtype, torch.float32))
        row_sum = None
        if renormalize:
            row_sum = s.sum(-1, keepdim=True)  # [T, 1]
            s = s / row_sum.clamp_min(1e-20)
        if mask is None:
            centred = s - s.mean(0, keepdim=True)  # [T, E]
            count = centred.new_full((), s.shape[0])
        else:  # statistics over the rows kept by the mask; other rows contribute 0
            m = mask.to(s.dtype).unsqueeze(-1)  # [T, 1]
            count = m.sum().clamp_min(1.0)
            centred = (s - (s * m).sum(0, keepdim=True) / count) * m  # [T, E]
        ctx.save_for_backward(centred, s, row_sum, count)
        ctx.renormalize = renormalize
        ctx.probs_dtype = probs.dtype
        return -centred.square().sum() / (count * s.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        centred, s, row_sum, count = ctx.saved_tensors
        ds = centred * (grad * -2.0 / (count * centred.shape[-1]))  # [T, E]
        if ctx.renormalize:
            clamped = row_sum <= 1e-20  # the clamp's derivative is 0 there
            through_sum = (ds * s).sum(-1, keepdim=True).masked_fill(clamped, 0.0)
            ds = (ds - through_sum) / row_sum.clamp_min(1e-20)
        return ds.to(ctx.probs_dtype), None, None


def routing_variance_loss(
    scores: Tensor, *, renormalize: bool = False, mask: Tensor | None = None
) -> Tensor:
    """Routing-variance (diversification) loss `L_v` (§9, Guo et al. eq 7), to be minimised.

    `L_v = −(1/(T·E)) Σ_j Σ_t (s_tj − s̄_j)²`, `s̄_j = (1/T) Σ_t s_tj`: minus the mean over experts of
    the population variance over the tokens of each expert's score. Minimising it spreads each
    expert's scores across tokens (sharper, less uniform routing).

    Args:
        scores: Post-top-k renormalised scores s, [T, E] (`topk_scores`); with ``renormalize``,
            post-top-k probabilities `p` (zero outside the top-k) that are divided by their row
            sums here, inside the same fused backward.
        renormalize: Divide each row by its sum first (`s = p / Σ_j p_j`).
        mask: Optional bool [T]: only these rows count (T = their number; padding tokens), as
            if the others were not there, without a data-dependent shape (no host sync).

    Returns:
        0-dim tensor, ≤ 0.
    """
    if scores.shape[0] == 0:
        return scores.sum()
    return _RoutingVariance.apply(scores, renormalize, mask)
