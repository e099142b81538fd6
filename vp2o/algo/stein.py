"""Stein variational transport of one MoE layer's expert gradients (method §3-§8).

Glossary: E experts, d model width, f expert ffn width, P parameters of one expert (flattened),
T tokens, n power-iteration steps, r = 2n the rank of one expert's repulsion gradient.
Leading `...` dimensions (e.g. a layer dimension `[layers, E, ...]`) are accepted where noted.

Pipeline for one layer and one optimizer step (`transport` does steps 2-5):

1. `coactivation` (§3): `C = rᵀr / T` from the routing map (the caller all-reduces the counts).
2. `neighbour_masks` (§3): `M_co`, `M_in`.
3. `prototype_kernel` (§5) on the stored prototypes `u` (refreshed by `refresh_prototypes`, §4):
   `axial_kernel` (the method's) or `signed_kernel` (`vp2o.kernel = signed`).
4. `attraction` (§6): `Φ_att = A·G`, one matrix product per gradient tensor.
5. `repulsion` (§7): `φ_rep(j) = ∇_{W2_j} Σ_i v_ji k(u_i, u'_j(W2_j))`.

Clarifications of, and choices beyond, the method doc (said plainly):

- Repulsion is computed with a hand-written backward through the `n` power-iteration steps (§7),
  not with autograd. Each step `s = W(Wᵀx)` contributes two rank-1 terms to `∂/∂W`, so expert `j`'s
  repulsion gradient is `L_j R_j` with `L_j ∈ R^{d×2n}`, `R_j ∈ R^{2n×f}` (`repulsion_factors`).
  `transport` adds `α L R` straight into the attraction output (no `[E, d, f]` temporary).
  `repulsion_autograd` is the plain autograd form; tests check the two agree and match finite
  differences.
- Inactive experts (§8: `C_jj = 0`): `attraction` computes every row by the formula; with
  `active=` (or a `M_co` row holding only `j`, which is what `neighbour_masks` builds for an
  inactive `j`) row `j` of `A` is the unit row `e_j`, so row `j` of the output equals `g_j`
  bit for bit. `repulsion(..., active=)` returns zero rows for inactive experts. So the
  caller passes inactive experts through by passing `active`; `transport` does so.
- `neighbour_masks` reads "`C_ji ≥ c_min · C_jj > 0`" as a chain: `C_ji ≥ c_min·C_jj` and
  `c_min·C_jj > 0`. So `min_frac = 0` disables that criterion (rather than admitting every
  expert), and an inactive expert never enters anyone's co-active set through it.
- `median_temperature` (`vp2o.tau_mode = median`): `τ = τ0 · median_{i≠j} dist(u_i, u_j) / log E`,
  with the median floored at 1e-6 so collapsed prototypes do not give `τ = 0`; `dist` is the
  kernel's distance (`1 − (u_iᵀu_j)²` axial, `1 − u_iᵀu_j` signed).
- The signed kernel (`vp2o.kernel = signed`, beyond the method): `k_ij = exp(−(1 − u_iᵀu_j)/τ)`,
  a function of the angle θ_ij only (`1 − cos θ = ‖u_i − u_j‖²/2`, so it is the Gaussian RBF of
  the chordal distance on the sphere: positive definite, unlike `exp(−θ²/τ)`). Its slope in the
  cosine is `k/τ`, so the repulsion of near-orthogonal prototypes does not vanish, while the
  axial kernel's slope `2ck/τ` does (∝ cos). It reads the prototypes' signs, which the
  warm-started power iteration keeps from step to step (§4; `init_prototypes` fixes them).
- Performance: matrix-vector products are written as row-vector products (`xᵀW`, `zᵀWᵀ`), the
  form batched GEMM handles well on CPU (`W z` as a batched `bmm` is 3-4x slower there). On CPU
  the experts are processed in blocks of at most 16 MiB of `W2`, so a block stays in the
  last-level cache across the `2n` products of the refresh or the `4n − 1` of the repulsion, and
  `transport` writes the W2 output in row tiles of about 1 MiB so the rank-2n update reads a tile
  still in cache. On accelerators both default to one batch.
- Tensor parallelism of experts (`W2_j` split along f): pass `allreduce`, a function that sums a
  `[..., d]` tensor over the expert-tensor-parallel group; it is applied to `W2(W2ᵀx)` and, in the
  repulsion backward, to `W2 gz`. The power iteration then runs batched (no chunking).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "attraction",
    "KERNELS",
    "attraction_weights",
    "axial_kernel",
    "coactivation",
    "coactivation_counts",
    "init_prototypes",
    "median_temperature",
    "neighbour_masks",
    "power_iteration",
    "prototype_kernel",
    "refresh_prototypes",
    "repulsion",
    "repulsion_autograd",
    "repulsion_factors",
    "repulsion_weights",
    "signed_kernel",
    "temperature",
    "transport",
]

AllReduce = Callable[[Tensor], Tensor]
_TINY = 1e-30
_CPU_BLOCK_BYTES = 16 * 2**20  # half a typical server L3: a block of W2 stays cached
_CPU_TILE_BYTES = 2**20  # output tile of the W2 attraction + repulsion on CPU (>= 16 rows)
KERNELS = ("axial", "signed")
"""Prototype kernels (`vp2o.kernel`): `axial` (§5, the method's) and `signed`."""


# --------------------------------------------------------------------------------------------
# §5 temperature and kernel
# --------------------------------------------------------------------------------------------


def temperature(num_experts: int, tau0: float = 1.0) -> float:
    """Kernel temperature `τ = τ0 / log E` (§5, `vp2o.tau_mode = log_e`).

    With `τ0 = 1` two orthogonal experts get `k = exp(−log E) = 1/E`.

    Args:
        num_experts: E, at least 2.
        tau0: Base temperature τ0 > 0 (`vp2o.tau0`).

    Returns:
        τ as a Python float.
    """
    if num_experts < 2:
        raise ValueError(f"the kernel temperature needs at least 2 experts, got {num_experts}")
    if tau0 <= 0:
        raise ValueError(f"tau0 must be > 0, got {tau0}")
    return tau0 / math.log(num_experts)


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")


def _distance_of_cos(cos: Tensor, kernel: str) -> Tensor:
    """The kernel's distance as a function of the cosine: `1 − c²` (axial), `1 − c` (signed)."""
    return (1.0 - cos * cos if kernel == "axial" else 1.0 - cos).clamp_min(0.0)


def _kernel_of_cos(cos: Tensor, tau: float | Tensor, kernel: str) -> tuple[Tensor, Tensor]:
    """`(k, ∂k/∂c)` at cosines `c` (`tau` broadcasts): axial `2ck/τ`, signed `k/τ`."""
    k = torch.exp(-_distance_of_cos(cos, kernel) / tau)
    slope = k * cos * (2.0 / tau) if kernel == "axial" else k / tau
    return k, slope


def _distance(u: Tensor, kernel: str = "axial") -> Tensor:
    """The kernel's distance of every pair, exact zero diagonal. u: [..., E, d] -> [..., E, E]."""
    _check_kernel(kernel)
    e = u.shape[-2]
    dist = _distance_of_cos(u @ u.mT, kernel)  # [..., E, E]
    eye = torch.eye(e, dtype=torch.bool, device=u.device)
    return dist.masked_fill(eye, 0.0)


def median_temperature(u: Tensor, *, tau0: float = 1.0, kernel: str = "axial") -> Tensor:
    """Median-heuristic temperature (§5, `vp2o.tau_mode = median`).

    `τ = τ0 · median_{i≠j} dist(u_i, u_j) / log E`, the median floored at 1e-6; `dist` is
    `1 − (u_iᵀu_j)²` for the axial kernel, `1 − u_iᵀu_j` for the signed one.

    Args:
        u: Unit prototypes, [..., E, d].
        tau0: Scale τ0 > 0.
        kernel: `axial` or `signed` (`vp2o.kernel`).

    Returns:
        τ, a tensor of shape [...] (0-dim for one layer).
    """
    e = u.shape[-2]
    if e < 2:
        raise ValueError(f"the kernel temperature needs at least 2 experts, got {e}")
    dist = _distance(u, kernel)  # [..., E, E]
    off = ~torch.eye(e, dtype=torch.bool, device=u.device)
    vals = dist[..., off]  # [..., E*(E-1)]
    med = torch.quantile(vals, 0.5, dim=-1).clamp_min(1e-6)  # [...]
    return tau0 * med / math.log(e)


def _tau_tensor(tau: float | Tensor) -> float | Tensor:
    """Makes a per-layer τ of shape [...] broadcast against [..., E, E]."""
    if isinstance(tau, Tensor) and tau.dim() > 0:
        return tau[..., None, None]
    return tau


def axial_kernel(u: Tensor, tau: float | Tensor) -> Tensor:
    """Axial (sign-invariant) prototype kernel (§5, eq 8).

    `K_ij = exp(−(1 − (u_iᵀu_j)²) / τ)`, `K_jj = 1` exactly.

    Args:
        u: Unit prototypes, [..., E, d].
        tau: Temperature τ (a float, or a tensor of shape [...]).

    Returns:
        K, [..., E, E], symmetric.
    """
    return torch.exp(-_distance(u, "axial") / _tau_tensor(tau))


def signed_kernel(u: Tensor, tau: float | Tensor) -> Tensor:
    """Signed angular prototype kernel (`vp2o.kernel = signed`; not in the method).

    `K_ij = exp(−(1 − u_iᵀu_j)/τ) = exp(−‖u_i − u_j‖²/(2τ))`, `K_jj = 1` exactly: a function of
    the angle between u_i and u_j (not of the axis), the Gaussian kernel of the chordal distance
    on the unit sphere. At `τ = 1/log E` orthogonal prototypes get `1/E` (as with the axial
    kernel), opposite ones `1/E²`.

    Args:
        u: Unit prototypes, [..., E, d].
        tau: Temperature τ (a float, or a tensor of shape [...]).

    Returns:
        K, [..., E, E], symmetric.
    """
    return torch.exp(-_distance(u, "signed") / _tau_tensor(tau))


def prototype_kernel(u: Tensor, tau: float | Tensor, kernel: str = "axial") -> Tensor:
    """`axial_kernel` or `signed_kernel` by name (`vp2o.kernel`)."""
    _check_kernel(kernel)
    return axial_kernel(u, tau) if kernel == "axial" else signed_kernel(u, tau)


# --------------------------------------------------------------------------------------------
# §4 prototypes: power iteration
# --------------------------------------------------------------------------------------------


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _pi_step(w: Tensor, x: Tensor, allreduce: AllReduce | None) -> tuple[Tensor, Tensor]:
    """One un-normalised step: `z = Wᵀx`, `s = W z`. w: [..., d, f], x: [..., d]."""
    z = (x.unsqueeze(-2) @ w).squeeze(-2)  # [..., f]
    s = (z.unsqueeze(-2) @ w.mT).squeeze(-2)  # [..., d]
    if allreduce is not None:
        s = allreduce(s)
    return z, s


def _normalise(s: Tensor) -> tuple[Tensor, Tensor]:
    n = torch.linalg.vector_norm(s, dim=-1, keepdim=True).clamp_min(_TINY)  # [..., 1]
    return s / n, n


def power_iteration(
    w2: Tensor, u: Tensor, iters: int, *, allreduce: AllReduce | None = None
) -> Tensor:
    """`iters` steps of `u ← normalize(W2 (W2ᵀ u))` (§4), differentiable in `w2` and `u`.

    Converges to the top left singular vector of `W2` (megatron layout `[d_model, d_ffn]`), the
    principal eigenvector of `W2 W2ᵀ`, keeping the sign of the start's component along it. The
    d×d matrix is never formed: each step is two batched matrix-vector products.

    Args:
        w2: Output projections, [..., E, d, f] (or [d, f]); half precision is computed in float32.
        u: Start vectors, [..., E, d] (need not be unit).
        iters: Number of steps n >= 0 (0 returns `u` normalised).
        allreduce: Sums a [..., d] tensor over the expert-tensor-parallel group (w2 split along f).

    Returns:
        Unit vectors, [..., E, d], in float32 (or float64 for float64 inputs).
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    dt = _compute_dtype(w2)
    w = w2.to(dt)
    x, _ = _normalise(u.to(dt))
    for _ in range(iters):
        _, s = _pi_step(w, x, allreduce)
        x, _ = _normalise(s)
    return x


def _expert_slices(num: int, chunk: int | None, w2: Tensor) -> list[slice]:
    """Expert blocks for the power iterations; default: all, or ≤ 16 MiB of W2 per block on CPU."""
    if chunk is None:
        per_expert = w2[0].numel() * w2.element_size() if num else 1
        chunk = max(1, _CPU_BLOCK_BYTES // per_expert) if w2.device.type == "cpu" else num
    if chunk < 1:
        raise ValueError(f"expert_chunk must be >= 1, got {chunk}")
    return [slice(i, min(i + chunk, num)) for i in range(0, num, chunk)]


@torch.no_grad()
def refresh_prototypes(
    w2: Tensor,
    u: Tensor,
    *,
    iters: int,
    expert_chunk: int | None = None,
    allreduce: AllReduce | None = None,
) -> Tensor:
    """Prototype refresh after an optimizer step (§4): `power_iteration` warm-started from `u`.

    Args:
        w2: Output projections, [..., E, d, f].
        u: Stored prototypes, [..., E, d].
        iters: Steps n (`vp2o.power_iters`, default 2).
        expert_chunk: Experts per block of batched products (None: blocks of <= 16 MiB of W2 on
            CPU, all experts elsewhere; ignored, i.e. all, when `allreduce` is given).
        allreduce: See `power_iteration`.

    Returns:
        New unit prototypes, [..., E, d], float32 (float64 for float64 input), no autograd history.
    """
    d, f = w2.shape[-2:]
    wf = w2.reshape(-1, d, f)  # [E', d, f]
    uf = u.reshape(-1, d)  # [E', d]
    if allreduce is not None:
        return power_iteration(wf, uf, iters=iters, allreduce=allreduce).reshape(u.shape)
    out = torch.empty(uf.shape, dtype=_compute_dtype(w2), device=u.device)  # [E', d]
    for sl in _expert_slices(wf.shape[0], expert_chunk, wf):
        out[sl] = power_iteration(wf[sl], uf[sl], iters=iters)
    return out.reshape(u.shape)


def init_prototypes(
    w2: Tensor,
    *,
    seed: int = 0,
    iters: int = 20,
    experts: slice | None = None,
    num_experts: int | None = None,
) -> Tensor:
    """Initial prototypes (§4): `iters` power-iteration steps from a fixed-seed random start.

    The start is drawn on the CPU with `torch.Generator().manual_seed(seed)` for all E experts,
    then the rows `experts` are kept: expert j starts from the same vector whatever the device, the
    global RNG and the expert-parallel size, and so converges to the same prototype, sign included.

    Args:
        w2: Output projections of the experts to initialise, [E_loc, d, f].
        seed: Seed of the random start (the same on every rank).
        iters: Steps (20 in the method).
        experts: Which of the E experts `w2` holds (default: all of them, E_loc = E).
        num_experts: E (default E_loc).

    Returns:
        Unit prototypes, [E_loc, d], float32 (float64 for float64 `w2`).
    """
    e_loc, d, _ = w2.shape
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(num_experts or e_loc, d, generator=gen)  # [E, d]
    start = start[experts if experts is not None else slice(None)]  # [E_loc, d]
    if start.shape[0] != e_loc:
        raise ValueError(f"experts selects {start.shape[0]} of the start rows, w2 has {e_loc}")
    return refresh_prototypes(w2, start.to(w2.device), iters=iters)


# --------------------------------------------------------------------------------------------
# §3 co-activation and neighbour masks
# --------------------------------------------------------------------------------------------


def coactivation_counts(routing_map: Tensor) -> Tensor:
    """Co-activation counts `rᵀr` (§3, eq 6, before dividing by T).

    This is the quantity to all-reduce over data/expert/tensor/context-parallel ranks (together
    with the token count); exact in float32 up to 2²⁴ tokens.

    Args:
        routing_map: Boolean routing rows `r_t`, [..., T, E].

    Returns:
        `Σ_t r_ti r_tj`, [..., E, E], float32.
    """
    r = routing_map.to(torch.float32)  # [..., T, E]
    return r.mT @ r  # [..., E, E]


def coactivation(routing_map: Tensor) -> Tensor:
    """Co-activation matrix `C_ij = (1/T) Σ_t r_ti r_tj` (§3, eq 6).

    `C_jj` is expert j's usage; the active set is `{j : C_jj > 0}`. T = 0 gives zeros.

    Args:
        routing_map: Boolean routing rows, [..., T, E].

    Returns:
        C, [..., E, E], float32.
    """
    t = routing_map.shape[-2]
    return coactivation_counts(routing_map) / max(t, 1)


_TIE_TOL = 1e-6


def neighbour_masks(C: Tensor, top_m: int, min_frac: float) -> tuple[Tensor, Tensor]:
    """Co-active and inactive neighbour masks (§3.2). Row j is expert j's neighbourhood.

    `M_co[j,i] = 1` iff `i = j`, or i is among the `top_m` largest off-diagonal entries of row j
    with `C_ji > 0`, or `C_ji ≥ min_frac·C_jj` (to a relative 1e-6: exact ties are common, and
    rounding must not decide them) with `min_frac·C_jj > 0`.
    `M_in[j,i] = 1 − M_co[j,i]` for `i ≠ j`, `M_in[j,j] = 0`. Ties among the top-m go to the
    lower index (a stable sort; `torch.topk` breaks them differently on CPU and CUDA, and C holds
    exact ties often: it is a matrix of token counts).

    Args:
        C: Co-activation matrix, [..., E, E].
        top_m: m (`vp2o.coactive_top_m`, default k); clipped to E − 1.
        min_frac: c_min (`vp2o.coactive_min_frac`, default 0.1); 0 disables the criterion.

    Returns:
        (M_co, M_in), boolean, [..., E, E] each.
    """
    if top_m < 0:
        raise ValueError(f"top_m must be >= 0, got {top_m}")
    e = C.shape[-1]
    eye = torch.eye(e, dtype=torch.bool, device=C.device)
    m_co = eye.expand(C.shape).clone()  # [..., E, E]
    m = min(top_m, e - 1)
    if m > 0:
        off = C.masked_fill(eye, float("-inf"))
        vals, idx = off.sort(dim=-1, descending=True, stable=True)
        vals, idx = vals[..., :m], idx[..., :m]  # [..., E, m]
        m_co.scatter_(-1, idx, vals > 0)
    thr = min_frac * C.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # [..., E, 1]
    # C holds token counts (over T): C_ji = c_min C_jj exactly is common (2 of 20 tokens at
    # c_min = 0.1), and then rounding would decide, differently on CPU and CUDA (which divides by
    # T through a reciprocal). Equality up to a relative _TIE_TOL counts as >=.
    m_co |= (C >= thr * (1 - _TIE_TOL)) & (thr > 0)
    m_in = ~m_co & ~eye
    return m_co, m_in


# --------------------------------------------------------------------------------------------
# §6 attraction
# --------------------------------------------------------------------------------------------


def attraction_weights(K: Tensor, M_co: Tensor, *, active: Tensor | None = None) -> Tensor:
    """Row-normalised attraction weights (§6, eq 9): `a_ji = M_co[j,i] k_ji / Σ_l M_co[j,l] k_jl`.

    Args:
        K: Kernel, [..., E, E].
        M_co: Co-active neighbour mask, bool [..., E, E] (must hold the diagonal for `a_jj > 0`).
        active: Optional bool [..., E]; rows of inactive experts become the unit row `e_j`.

    Returns:
        A, [..., E, E], rows summing to 1.
    """
    w = K * M_co  # [..., E, E]
    a = w / w.sum(-1, keepdim=True).clamp_min(_TINY)
    if active is not None:
        eye = torch.eye(K.shape[-1], dtype=a.dtype, device=a.device)
        a = torch.where(active.unsqueeze(-1), a, eye)
    return a


def attraction(
    grads: Tensor,
    K: Tensor,
    M_co: Tensor,
    *,
    active: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Kernel-weighted gradient averaging `Φ_att = A · G` (§6, eq 7, 9).

    `φ_att(j) = Σ_i a_ji g_i` with `a = attraction_weights(K, M_co)`: one matrix product, G the
    experts' flattened gradients. Rows of inactive experts (`C_jj = 0`) are outside the formula's
    domain (§8 passes `g_j` through): pass `active` and those rows are exactly `g_j`. Without
    `active` every row is computed by the formula (which, for an inactive j whose `M_co` row is
    `{j}` as `neighbour_masks` builds it, is also exactly `g_j`). No copy of G is made beyond the
    output (for G viewable as [E, P]).

    Args:
        grads: Expert gradients, [E, ...] (e.g. fc1 [E, 2f, d] or fc2 [E, d, f] or flat [E, P]).
        K: Kernel, [E, E].
        M_co: Co-active mask, bool [E, E].
        active: Optional bool [E].
        out: Optional output tensor of the same shape as `grads` (may be a strided view).

    Returns:
        Φ_att, same shape as `grads`.
    """
    e = grads.shape[0]
    a = attraction_weights(K, M_co, active=active).to(grads.dtype)  # [E, E]
    g = grads.reshape(e, -1)  # [E, P]
    if out is None:
        return (a @ g).view(grads.shape)
    torch.mm(a, g, out=out.view(e, -1))
    return out


# --------------------------------------------------------------------------------------------
# §7 repulsion
# --------------------------------------------------------------------------------------------


def repulsion_weights(
    K: Tensor, M_in: Tensor, *, eps: float = 1e-12, active: Tensor | None = None
) -> Tensor:
    """Repulsion weights (§7): `v_ji = M_in[j,i] k_ji / max(ε, Σ_l M_in[j,l] k_jl)` (constants).

    Args:
        K: Kernel from the stored prototypes, [..., E, E].
        M_in: Inactive-neighbour mask, bool [..., E, E].
        eps: ε of the denominator.
        active: Optional bool [..., E]; rows of inactive experts are zeroed (§8: no repulsion).

    Returns:
        V, [..., E, E].
    """
    w = K * M_in  # [..., E, E]
    v = w / w.sum(-1, keepdim=True).clamp_min(eps)
    if active is not None:
        v = v * active.unsqueeze(-1)
    return v


def _repulsion_block(
    w: Tensor,
    x0: Tensor,
    u_all: Tensor,
    v: Tensor,
    tau: float | Tensor,
    iters: int,
    allreduce: AllReduce | None,
    kernel: str,
) -> tuple[Tensor, Tensor]:
    """Factors of `∇_W Σ_i v_i k(u_i, PI_n(W, x0))` for a block of experts.

    w: [e, d, f], x0: [e, d], u_all: [E, d], v: [e, E] -> ([e, d, 2n], [e, 2n, f]).
    Forward: x_{m+1} = s_m/|s_m|, s_m = W z_m, z_m = Wᵀ x_m. Backward of one step with upstream
    g = ∂F/∂x_{m+1}: gs = (g − x_{m+1}(x_{m+1}·g))/|s_m|, ∂F/∂W += gs z_mᵀ + x_m gzᵀ with
    gz = Wᵀ gs, and ∂F/∂x_m = W gz.
    """
    xs, zs, ys, ns = [], [], [], []
    x, _ = _normalise(x0)
    for _ in range(iters):
        z, s = _pi_step(w, x, allreduce)
        y, n = _normalise(s)
        xs.append(x)
        zs.append(z)
        ys.append(y)
        ns.append(n)
        x = y
    # x = u'_j; F = Σ_i v_ji k(c_i), c_i = u_iᵀu'_j; ∂F/∂u' = Σ_i v_ji k'(c_i) u_i with
    # k' = 2c k/τ (axial) or k/τ (signed)
    _, slope = _kernel_of_cos(x @ u_all.mT, tau, kernel)  # [e, E]
    gx = (v * slope) @ u_all  # [e, d]
    lefts: list[Tensor] = []
    rights: list[Tensor] = []
    for m in reversed(range(iters)):
        y = ys[m]
        gs = (gx - y * (y * gx).sum(-1, keepdim=True)) / ns[m]  # [e, d]
        gz = (gs.unsqueeze(-2) @ w).squeeze(-2)  # [e, f]
        lefts += [gs, xs[m]]
        rights += [zs[m], gz]
        if m > 0:
            gx = (gz.unsqueeze(-2) @ w.mT).squeeze(-2)  # [e, d]
            if allreduce is not None:
                gx = allreduce(gx)
    if not lefts:
        f = w.shape[-1]
        return gx.new_zeros(*gx.shape, 0), gx.new_zeros(*gx.shape[:-1], 0, f)
    return torch.stack(lefts, -1), torch.stack(rights, -2)  # [e, d, 2n], [e, 2n, f]


@torch.no_grad()
def repulsion_factors(
    w2: Tensor,
    u: Tensor,
    V: Tensor,
    *,
    tau: float | Tensor,
    iters: int,
    u_all: Tensor | None = None,
    expert_chunk: int | None = None,
    allreduce: AllReduce | None = None,
    kernel: str = "axial",
) -> tuple[Tensor, Tensor]:
    """Low-rank factors of the repulsion gradient (§7): `φ_rep(j) = L_j R_j`.

    `φ_rep(j) = ∇_{W2_j} Σ_i v_ji k(u_i, u'_j(W2_j))`, `u'_j = power_iteration(W2_j, u_j, n)` with
    `u_j` detached, `u_i` detached, k the `kernel` (axial or signed) at temperature τ. Computed
    with an explicit backward through the n steps; each step contributes two rank-1 terms, so
    rank ≤ 2n.

    Args:
        w2: Output projections of the experts to transform, [E_loc, d, f].
        u: Their stored prototypes (power-iteration starts), [E_loc, d].
        V: Their repulsion weights, [E_loc, E] (`repulsion_weights`, rows of these experts).
        tau: Kernel temperature.
        iters: Power-iteration steps n (the same as §4).
        u_all: Prototypes of all E experts, [E, d] (default `u`, i.e. E_loc = E).
        expert_chunk: Experts per block (see `refresh_prototypes`; ignored with `allreduce`).
        allreduce: See `power_iteration`.
        kernel: `axial` or `signed` (`vp2o.kernel`).

    Returns:
        (L [E_loc, d, 2n], R [E_loc, 2n, f]) in float32 (float64 for float64 input).
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    _check_kernel(kernel)
    u_all = u if u_all is None else u_all
    dt = _compute_dtype(w2)
    u_all = u_all.to(dt)
    if allreduce is not None:
        return _repulsion_block(
            w2.to(dt), u.to(dt), u_all, V.to(dt), tau, iters, allreduce, kernel
        )
    e, d, f = w2.shape
    r = 2 * iters
    left = torch.empty(e, d, r, dtype=dt, device=w2.device)  # [E_loc, d, 2n]
    right = torch.empty(e, r, f, dtype=dt, device=w2.device)  # [E_loc, 2n, f]
    for sl in _expert_slices(e, expert_chunk, w2):
        lb, rb = _repulsion_block(
            w2[sl].to(dt), u[sl].to(dt), u_all, V[sl].to(dt), tau, iters, None, kernel
        )
        left[sl] = lb
        right[sl] = rb
    return left, right


def repulsion(
    w2: Tensor,
    u: Tensor,
    K: Tensor,
    M_in: Tensor,
    tau: float | Tensor,
    iters: int,
    *,
    active: Tensor | None = None,
    eps: float = 1e-12,
    expert_chunk: int | None = None,
    kernel: str = "axial",
) -> Tensor:
    """Repulsion field of one layer (§7): `φ_rep(j) = ∇_{W2_j} Σ_i v_ji k(u_i, u'_j(W2_j))`.

    `v = repulsion_weights(K, M_in)`; see `repulsion_factors`. The optimizer subtracts
    `α φ_rep`, which lowers `k_ji`: expert j moves away from its inactive neighbours (§8).

    Args:
        w2: Output projections, [E, d, f].
        u: Stored prototypes (after the previous optimizer step), [E, d].
        K: Kernel of the stored prototypes, [E, E].
        M_in: Inactive-neighbour mask, bool [E, E].
        tau: Kernel temperature.
        iters: Power-iteration steps n.
        active: Optional bool [E]; rows of inactive experts are zero.
        eps: ε of the weight denominator.
        expert_chunk: See `repulsion_factors`.
        kernel: The kernel K was built with (`axial` or `signed`).

    Returns:
        φ_rep, [E, d, f], in w2's dtype.
    """
    v = repulsion_weights(K, M_in, eps=eps, active=active)  # [E, E]
    left, right = repulsion_factors(
        w2, u, v, tau=tau, iters=iters, expert_chunk=expert_chunk, kernel=kernel
    )
    return torch.bmm(left, right).to(w2.dtype)  # [E, d, f]


def repulsion_autograd(
    w2: Tensor,
    u: Tensor,
    V: Tensor,
    *,
    tau: float | Tensor,
    iters: int,
    u_all: Tensor | None = None,
    kernel: str = "axial",
) -> Tensor:
    """Reference form of `repulsion_factors` through autograd (§7); slower, same result.

    Since `u'_j` depends on `W2_j` only, one `autograd.grad` of `Σ_j Σ_i v_ji k(u_i, u'_j)` gives
    every expert's row. Not used in training: it is the independent float64 reference of
    `benchmarks/gpu_checks.py` (check 3) and of the tests, kept here for the GPU check.

    Args:
        w2: [E_loc, d, f]. u: [E_loc, d]. V: [E_loc, E]. u_all: [E, d] (default `u`).
        tau: Kernel temperature.
        iters: Power-iteration steps n.
        kernel: `axial` or `signed`.

    Returns:
        φ_rep, [E_loc, d, f], in the compute dtype (float32/float64).
    """
    _check_kernel(kernel)
    u_all = (u if u_all is None else u_all).detach().to(_compute_dtype(w2))
    with torch.enable_grad():
        w = w2.detach().to(_compute_dtype(w2)).requires_grad_(True)
        up = power_iteration(w, u.detach(), iters=iters)  # [E_loc, d]
        c = up @ u_all.mT  # [E_loc, E]
        dist = 1.0 - c * c if kernel == "axial" else 1.0 - c
        objective = (V.to(c.dtype) * torch.exp(-dist / tau)).sum()
        if not objective.requires_grad:  # iters = 0: u' = u does not depend on W2
            return torch.zeros_like(w)
        (grad,) = torch.autograd.grad(objective, w)
    return grad


# --------------------------------------------------------------------------------------------
# §8 the transformed gradient of one layer
# --------------------------------------------------------------------------------------------


def transport(
    grads: Sequence[Tensor],
    w2: Tensor,
    u: Tensor,
    C: Tensor,
    *,
    w2_index: int,
    tau: float | Tensor,
    alpha: float,
    top_m: int,
    min_frac: float,
    iters: int,
    out: Sequence[Tensor] | None = None,
    expert_chunk: int | None = None,
    eps: float = 1e-12,
    attraction_norm: bool = False,
    tile_rows: int | None = None,
    kernel: str = "axial",
    attract: bool = True,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Stein-transformed expert gradients of one layer (§3, §5-§8, eq 10).

    `g̃_j = φ_att(j) + α φ_rep(j)` for active j (`C_jj > 0`), `g̃_j = g_j` otherwise. The kernel
    uses the stored prototypes `u` (§7). The repulsion goes to the output projection only:
    `grads[w2_index]`, which must be viewable as [E, d, f]. With `attract=False`
    (`vp2o.attraction = false`) `φ_att(j) = g_j`: `g̃_j = g_j + α φ_rep(j)`.

    Args:
        grads: One layer's expert gradients, each [E, ...] (e.g. fc1 [E, 2f, d], fc2 [E, d, f]).
        w2: Output projections, [E, d, f].
        u: Stored prototypes, [E, d].
        C: Co-activation matrix, [E, E] (already all-reduced).
        w2_index: Index of W2's gradient in `grads`.
        tau: Kernel temperature (`temperature` or `median_temperature`).
        alpha: Repulsion strength α (`vp2o.alpha`).
        top_m: `vp2o.coactive_top_m`.
        min_frac: `vp2o.coactive_min_frac`.
        iters: Power-iteration steps n (`vp2o.power_iters`).
        out: Optional output tensors, shaped like `grads` (must not alias them).
        expert_chunk: See `repulsion_factors`.
        eps: ε of the repulsion weights.
        attraction_norm: Also report `stein/attraction_norm` (one extra read of the output).
        tile_rows: Rows of d per tile of the W2 output (None: about 1 MiB, at least 16 rows, on
            CPU; all of d elsewhere).
        kernel: `axial` (§5) or `signed` (`vp2o.kernel`).
        attract: False replaces A by the identity (no attraction term).

    Returns:
        (g̃ per tensor of `grads`, metrics): `stein/active_frac`, `stein/attraction_self_weight`
        (mean `a_jj` over active experts), `stein/coactive_neighbours` (mean |M_co row| − 1 over
        active experts), `stein/mean_abs_cos` (mean `|u_iᵀu_j|`, i≠j), `stein/kernel_offdiag_mean`,
        `stein/repulsion_norm` (`‖φ_rep‖_F` over the layer, before α) and, if asked,
        `stein/attraction_norm` (`‖Φ_att‖_F` over all tensors). All 0-dim tensors.
    """
    e = u.shape[0]
    d, f = w2.shape[-2:]
    active = C.diagonal() > 0  # [E]
    k = prototype_kernel(u, tau=tau, kernel=kernel)  # [E, E]
    m_co, m_in = neighbour_masks(C, top_m=top_m, min_frac=min_frac)
    if attract:
        a = attraction_weights(k, m_co, active=active)  # [E, E]
    else:
        a = torch.eye(e, dtype=k.dtype, device=k.device)
    v = repulsion_weights(k, m_in, eps=eps, active=active)  # [E, E]
    left, right = repulsion_factors(
        w2, u, v, tau=tau, iters=iters, expert_chunk=expert_chunk, kernel=kernel
    )

    results: list[Tensor] = []
    att_sq = torch.zeros((), dtype=torch.float32, device=u.device)
    for idx, g in enumerate(grads):
        o = torch.empty(g.shape, dtype=g.dtype, device=g.device) if out is None else out[idx]
        a_g = a.to(g.dtype)
        if idx != w2_index:
            torch.mm(a_g, g.reshape(e, -1), out=o.view(e, -1))  # [E, P_idx]
            if attraction_norm:
                att_sq = att_sq + o.float().square().sum()
            results.append(o)
            continue
        # W2: Φ_att + α L R, in row tiles so that each output tile is still cached when the
        # rank-2n update reads it back (one pass over the output instead of two on CPU).
        gv = g.reshape(e, d, f)
        ov = o.view(e, d, f)
        lt, rt = left.to(o.dtype), right.to(o.dtype)
        rows = tile_rows
        if rows is None:
            rows = max(16, _CPU_TILE_BYTES // (e * f * o.element_size())) if o.is_cpu else d
        for r0 in range(0, d, rows):
            r1 = min(d, r0 + rows)
            tile = ov[:, r0:r1]  # [E, rows, f]
            torch.mm(a_g, gv[:, r0:r1].reshape(e, -1), out=tile.view(e, -1))
            if attraction_norm:
                att_sq = att_sq + tile.float().square().sum()
            tile.baddbmm_(lt[:, r0:r1], rt, alpha=alpha)
        results.append(o)

    n_act = active.sum().clamp_min(1)
    off = ~torch.eye(e, dtype=torch.bool, device=u.device)
    cos = (u @ u.mT).abs()  # [E, E]
    # ‖L_j R_j‖_F² = trace((L_jᵀL_j)(R_j R_jᵀ))
    rep_sq = ((left.mT @ left) * (right @ right.mT)).sum()
    metrics = {
        "stein/active_frac": active.float().mean(),
        "stein/attraction_self_weight": (a.diagonal() * active).sum() / n_act,
        "stein/coactive_neighbours": ((m_co.sum(-1) - 1) * active).sum() / n_act,
        "stein/mean_abs_cos": cos[off].mean(),
        "stein/kernel_offdiag_mean": k[off].mean(),
        "stein/repulsion_norm": rep_sq.clamp_min(0).sqrt(),
    }
    if attraction_norm:
        metrics["stein/attraction_norm"] = att_sq.sqrt()
    return results, metrics
