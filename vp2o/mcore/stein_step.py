"""The Stein transform of expert gradients inside a megatron-core training step (method §3-§8).

Where it sits (see docs/design.md, "The Stein transform in the step"):

    forward/backward of all micro-batches   (routers accumulate r^T r, §3)
    -> SteinTransform.before_grad_reduction  (one all-reduce of every layer's C over TPxDPxCP;
                                              per layer: kernel, masks, A; expert main_grads
                                              <- A.G (+ alpha phi_rep), EP reduce-scatter)
    -> megatron finalize_model_grads         (the usual DP reduction; reduce-scatter with the
                                              distributed optimizer)
    -> optimizer.step                        (unscale, clip, update: any megatron optimizer)
    -> SteinTransform.after_optimizer_step   (prototype refresh, §4; EP all-gather)

Why before the data-parallel reduction: the attraction is linear and its matrix A is the same on
every rank once C is reduced, so A applied to each rank's partial gradients and then summed equals
A applied to the reduced gradient; the repulsion depends only on parameters, identical on every
replica, and is pre-divided by the factor the reduction multiplies by. After the distributed
optimizer's reduce-scatter a rank holds shards that cut across experts, so the transform could
not run there without an all-reduce of all expert gradients. Everything is on ``main_grad``
(fp32 with ``grad_reduce_in_fp32``), so FP32, Float16, Distributed and Chained optimizers all see
the transformed gradients, before their unscale/clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from vp2o.algo import stein
from vp2o.config import VP2OConfig
from vp2o.mcore import expert_layout
from vp2o.mcore.expert_layout import local_expert_weights  # noqa: F401 (re-exported)
from vp2o.mcore.parallel import ParallelGroups
from vp2o.mcore.vp2o_moe import moe_layers


def _main_grad(param) -> torch.Tensor:
    return expert_layout.main_grad(param)


def expert_bank_view(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """One strided [e, *shape] view of e same-shaped tensors that sit at a uniform stride.

    megatron's DDP keeps every gradient in one flat buffer (and, with the distributed optimizer,
    every parameter in another), parameter after parameter in reverse model order, so a layer's
    experts follow each other at a fixed stride (an expert's fc1 and fc2 in between). The
    transform reads and writes such tensors through the view instead of stacking them into a
    workspace and copying back: one copy of the layer's expert gradients less (issue 4's step
    overhead, docs/benchmarks.md).

    Returns:
        (view with rows in address order, order: row k is ``tensors[order[k]]``), or None when
        the tensors are not laid out that way (then callers stack them).
    """
    first = tensors[0]
    shape, numel = first.shape, first.numel()
    storage = first.untyped_storage().data_ptr()
    for t in tensors:
        if (
            t.shape != shape
            or t.dtype != first.dtype
            or t.device != first.device
            or not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
    offsets = [t.storage_offset() for t in tensors]
    order = sorted(range(len(tensors)), key=offsets.__getitem__)
    base = offsets[order[0]]
    step = offsets[order[1]] - base if len(tensors) > 1 else numel
    if step < numel or any(offsets[i] - base != k * step for k, i in enumerate(order)):
        return None
    view = first.as_strided((len(tensors), *shape), (step, *first.stride()), base)
    return view, tuple(order)


@dataclass
class _ExpertBank:
    """One layer's local expert tensors of one kind (e.g. the fc2 grads) as rows in one order.

    Read once per layer and kind (megatron's buffers do not move) and reused every step;
    ``address`` (the first tensor's data pointer when read) revalidates it, so a step reads one
    attribute per layer and kind, not every expert's.
    """

    tensors: list[torch.Tensor]  # the local experts' tensors, local order
    view: torch.Tensor | None  # [E_loc, *shape] strided view, row k = local expert order[k]
    order: tuple[int, ...]  # row k holds local expert order[k] (identity when stacked)
    index: torch.Tensor  # the same as a long tensor on the tensors' device
    a_rows: torch.Tensor  # [E]: rows of A in reduce-scatter block order (every EP rank's order)
    a_cols: torch.Tensor  # [E_loc]: this rank's columns of A in row order
    address: int


@dataclass
class LayerGeometry:
    """Per-layer quantities of one step (all [E, E] unless noted), for logging and tests."""

    C: torch.Tensor
    K: torch.Tensor
    A: torch.Tensor
    V: torch.Tensor
    active: torch.Tensor  # [E] bool
    tau: float | torch.Tensor


class SteinTransform:
    """Owns the prototypes and applies the transport to this rank's expert gradients.

    Args:
        model: the unwrapped GPTModel built with ``vp2o_layer_spec_hook``.
        cfg: ``Config.vp2o``.
        groups: process groups (``vp2o.mcore.parallel.groups()``).
        num_experts: E.
        seed: seed of the initial prototypes' random start (§4).
        transport: False keeps everything but the gradient change (GRPO mode: the routing
            statistics and prototypes still feed the diagnostics).
    """

    def __init__(
        self,
        model,
        cfg: VP2OConfig,
        groups: ParallelGroups,
        *,
        num_experts: int,
        seed: int,
        transport: bool = True,
    ) -> None:
        self.cfg = cfg
        self.transport = transport
        self.groups = groups
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("model has no VP2O MoE layers: build it with vp2o_layer_spec_hook")
        self.num_experts = num_experts
        self.ep_size = dist.get_world_size(groups.ep)
        self.num_local = num_experts // self.ep_size
        self.local = slice(groups.ep_rank * self.num_local, (groups.ep_rank + 1) * self.num_local)
        self.seed = seed
        self._workspace: dict[str, torch.Tensor] = {}
        self._banks: dict[tuple[int, str], _ExpertBank] = {}
        # (fc1, fc2) parameter lists per layer: the modules' parameters are fixed objects (loads
        # copy into them), so the per-step code does not walk every layer's experts again.
        self._expert_params = [local_expert_weights(layer) for layer in self.layers]
        self.prototypes = self._gather_prototypes(
            [self._initial_prototypes(i) for i in range(len(self.layers))]
        )  # [L, E, d] fp32, identical on every rank
        self.anchor = self.prototypes.clone()
        self.last_geometry: list[LayerGeometry] = []
        self.coactivation: torch.Tensor | None = None  # [L, E, E] after reduce_statistics
        # vp2o.transport_specialisation=false: the layers hand over their specialisation losses
        # (the tensors megatron's aux-loss scaler attaches), whose expert gradients are kept
        # apart (``capture_specialisation``) and added back untransformed.
        self.separate_specialisation = (
            transport and not cfg.transport_specialisation
            and (cfg.ortho_coeff > 0 or cfg.variance_coeff > 0)
        )
        self._spec_grads: list[torch.Tensor] | None = None  # fp32, one per expert parameter
        for layer in self.layers:
            layer.live_losses = [] if self.separate_specialisation else None
            layer.router.live_losses = [] if self.separate_specialisation else None

    # ---------------------------------------------------------------- statistics (§3)
    def reduce_statistics(self) -> dict[str, torch.Tensor]:
        """All-reduce every layer's co-activation counts, token counts and entropy sums at once.

        Returns:
            ``C`` [L, E, E] (co-activation, normalised by the global token count), ``tokens``
            [L], ``router_entropy`` [L] (mean over tokens).
        """
        E = self.num_experts
        routers = [layer.router for layer in self.layers]
        flat = torch.cat(
            [
                torch.stack([r.coactivation_counts for r in routers]).reshape(-1),  # [L*E*E]
                torch.stack([r.routed_tokens for r in routers]),  # [L]
                torch.stack([r.entropy_sum for r in routers]),  # [L]
            ]
        )
        dist.all_reduce(flat, group=self.groups.tp_dp_cp)
        n = len(routers)
        counts = flat[: n * E * E].view(n, E, E)
        tokens = flat[n * E * E : n * E * E + n]
        entropy = flat[n * E * E + n :]
        self.coactivation = counts / tokens.clamp_min(1.0).view(n, 1, 1)
        return {"C": self.coactivation, "tokens": tokens, "router_entropy": entropy / tokens}

    def reset_statistics(self) -> None:
        """Zero the routers' per-step accumulators (and drop specialisation losses not taken
        by ``capture_specialisation``)."""
        for layer in self.layers:
            layer.router.reset_step_statistics()
            for live in (layer.live_losses, layer.router.live_losses):
                if live is not None:
                    live.clear()

    # ---------------------------------------------------------------- specialisation gradients
    def capture_specialisation(self) -> None:
        """Keep apart the expert gradients of the specialisation losses of the forward just run
        (``vp2o.transport_specialisation=false``; otherwise nothing to do).

        Call after each micro-batch's forward, before its backward (the learner's loss
        function). A second, partial backward (``torch.autograd.grad``, the graph kept for the
        main backward) gives d(sum of the losses megatron's aux-loss scaler attached)/d(expert
        weights); it is accumulated here unscaled and scaled in ``before_grad_reduction`` by the
        scaler's ``main_loss_backward_scale``, the factor the main backward applied to the same
        losses.
        """
        if not self.separate_specialisation:
            return
        losses = []
        for layer in self.layers:
            losses += layer.live_losses + layer.router.live_losses
            layer.live_losses.clear()
            layer.router.live_losses.clear()
        if not losses:
            return
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        params = self._expert_parameters()
        total = torch.stack([loss.float().reshape(()) for loss in losses]).sum()
        # A path from a later layer's loss passes the earlier layers' aux-loss scalers, whose
        # backward would inject their losses' gradients a second time: scale 0 while this runs.
        saved = MoEAuxLossAutoScaler.main_loss_backward_scale
        MoEAuxLossAutoScaler.main_loss_backward_scale = total.new_zeros(1)
        try:
            grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        finally:
            MoEAuxLossAutoScaler.main_loss_backward_scale = saved
        if self._spec_grads is None:
            self._spec_grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for acc, g in zip(self._spec_grads, grads, strict=True):
            if g is not None:
                acc.add_(g)

    def _apply_specialisation(self, sign: float) -> None:
        """main_grad += sign * (scaled specialisation gradients) of every local expert."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        for p, g in zip(self._expert_parameters(), self._spec_grads, strict=True):
            p.main_grad.add_(g if scale is None else g * scale.to(g.device), alpha=sign)

    def _expert_parameters(self) -> list[torch.Tensor]:
        """The distinct parameters holding this rank's expert weights (one per expert and
        projection, or one grouped [E_loc, ...] parameter per projection), in a fixed order."""
        seen: dict[int, torch.Tensor] = {}
        for fc1, fc2 in self._expert_params:
            for h in (*fc1, *fc2):
                p = getattr(h, "param", h)  # a grouped weight's per-expert handle: its parameter
                seen.setdefault(id(p), p)
        return list(seen.values())

    # ---------------------------------------------------------------- transform (§5-§8)
    def geometry(self, index: int, C: torch.Tensor) -> LayerGeometry:
        """Kernel, masks and weights of layer ``index`` from its reduced C and stored prototypes."""
        return self._geometry(self.prototypes[index], C, self.layers[index].router.topk)

    def _geometry(self, u: torch.Tensor, C: torch.Tensor, topk: int) -> LayerGeometry:
        """`geometry` for u [..., E, d] and C [..., E, E]: one batched call for all layers."""
        cfg = self.cfg
        if cfg.tau_mode == "median":
            tau = stein.median_temperature(u, tau0=cfg.tau0, kernel=cfg.kernel)
        else:
            tau = stein.temperature(self.num_experts, tau0=cfg.tau0)
        K = stein.prototype_kernel(u, tau=tau, kernel=cfg.kernel)
        M_co, M_in = stein.neighbour_masks(
            C, top_m=cfg.top_m(topk), min_frac=cfg.coactive_min_frac
        )
        active = torch.diagonal(C, dim1=-2, dim2=-1) > 0
        if cfg.attraction:
            A = stein.attraction_weights(K, M_co, active=active)
        else:  # vp2o.attraction=false: phi_att(j) = g_j
            A = torch.eye(C.shape[-1], dtype=K.dtype, device=K.device).expand(K.shape)
        V = stein.repulsion_weights(K, M_in, active=active)
        return LayerGeometry(C=C, K=K, A=A, V=V, active=active, tau=tau)

    @torch.no_grad()
    def before_grad_reduction(self, ddp_model) -> dict[str, torch.Tensor]:
        """Transform every local expert's ``main_grad`` in place (call before the DP reduction).

        Returns logging tensors (no host sync): ``stein/attraction_norm`` and
        ``stein/repulsion_norm``, the Frobenius norms over every expert of every layer (all EP
        ranks) of the two pieces this data-parallel replica adds to the expert-gradient reduction
        (both before it: A g_r, and alpha phi_rep pre-divided as the reduction requires; with one
        data-parallel replica exactly the pieces of the applied gradient; no attraction norm with
        ``vp2o.attraction=false``), ``router/entropy`` and the reduced ``C`` per layer.
        """
        stats = self.reduce_statistics()
        if not self.transport:
            return {"C": stats["C"], "router/entropy": stats["router_entropy"].mean()}
        spec = self.separate_specialisation and self._spec_grads is not None
        if spec:  # transform the policy-loss gradient only
            self._apply_specialisation(-1.0)
        repulsion_scale = self._repulsion_prescale(ddp_model)
        device = self.prototypes.device
        att_sq = torch.zeros((), dtype=torch.float32, device=device)
        rep_sq = torch.zeros((), dtype=torch.float32, device=device)
        # Every layer's kernel, masks and weights in one batched pass (one megatron config: one
        # top-k for all layers).
        every = self._geometry(self.prototypes, stats["C"], self.layers[0].router.topk)
        per_layer_tau = isinstance(every.tau, torch.Tensor)
        self.last_geometry = [
            LayerGeometry(C=every.C[i], K=every.K[i], A=every.A[i], V=every.V[i],
                          active=every.active[i], tau=every.tau[i] if per_layer_tau else every.tau)
            for i in range(len(self.layers))
        ]
        attract, scale = self.cfg.attraction, self.cfg.alpha * repulsion_scale
        for index, geo in enumerate(self.last_geometry):
            fc1, fc2 = self._expert_params[index]
            if attract:
                att_sq += self._attract(self._bank(index, "fc1.grad", fc1, _main_grad), geo.A)
            bank2 = self._bank(index, "fc2.grad", fc2, _main_grad)
            low_rank = None
            if self.cfg.alpha > 0:
                L, R = self._repulsion_factors(index, geo, bank2)  # rows: bank2.order
                # ||L_i R_i||_F^2 = sum((L_i^T L_i) * (R_i R_i^T)): rank-2n Gram matrices only.
                rep_sq += (scale**2) * ((L.mT @ L) * (R @ R.mT)).sum().float()
                low_rank = (L * scale, R)
            if attract:
                att_sq += self._attract(bank2, geo.A, low_rank=low_rank)
            elif low_rank is not None:
                self._add_low_rank(bank2, *low_rank)
        if spec:  # ... and add the specialisation losses' gradient back as it is
            self._apply_specialisation(1.0)
            for g in self._spec_grads:
                g.zero_()
        norms = self._sum_over_ep(torch.stack([att_sq, rep_sq])).sqrt()
        out = {
            "C": stats["C"],
            "router/entropy": stats["router_entropy"].mean(),
            "stein/repulsion_norm": norms[1],
        }
        if attract:
            out["stein/attraction_norm"] = norms[0]
        return out

    def _add_low_rank(self, bank: _ExpertBank, L: torch.Tensor, R: torch.Tensor) -> None:
        """``bank.tensors[order[k]] += L[k] R[k]`` in place (the repulsion without attraction)."""
        dtype = bank.tensors[0].dtype
        L, R = L.to(dtype), R.to(dtype)
        if bank.view is not None:
            bank.view.baddbmm_(L, R)  # [E_loc, d, f], strided into the grad buffer
            return
        for k, i in enumerate(bank.order):
            bank.tensors[i].addmm_(L[k], R[k])

    def _attract(self, bank: _ExpertBank, A: torch.Tensor, low_rank=None) -> torch.Tensor:
        """``bank.tensors`` (local experts' main_grads) <- rows of A.G (+ L R); one EP
        reduce-scatter when EP > 1.

        G is read in column chunks of at most ``vp2o.transform_chunk_elems / E`` columns, A.G of a
        chunk goes to a persistent workspace (no allocation per step: fresh multi-MB buffers cost
        page faults every step on the CPU) and is copied back over the chunk. Where megatron's
        grad buffer holds the experts at a uniform stride (``bank.view``) the chunks are strided
        views of the buffer itself, rows in the buffer's order; otherwise they are stacked into
        a second workspace. ``low_rank = (L [E_loc, d, r], R [E_loc, r, f])``, rows in the bank's
        order, adds ``L_i R_i`` to expert i's [d, f] gradient (the scaled repulsion, §8) while
        its chunk is still in the workspace, saving a read and a write of the fc2 gradients;
        chunks then hold whole rows of [d, f].

        Returns:
            The squared norm of this rank's attraction output (before the low-rank term).
        """
        grads = bank.tensors
        numel = grads[0].numel()
        E, e = self.num_experts, self.num_local
        dtype = grads[0].dtype
        view = None if bank.view is None else bank.view.view(e, numel)  # never a silent copy
        A = A.index_select(0, bank.a_rows).index_select(1, bank.a_cols).to(dtype)  # [E, E_loc]
        chunk = self.cfg.transform_chunk_elems
        if chunk is None:  # cache-sized on the CPU (docs/benchmarks.md), few launches elsewhere
            chunk = 1 << 20 if A.is_cpu else 1 << 26
        cols_per_chunk = max(1, min(numel, chunk // E))
        f = grads[0].shape[-1]
        if low_rank is not None:
            cols_per_chunk = max(f, cols_per_chunk // f * f)  # whole rows
            L, R = (t.to(dtype) for t in low_rank)
        out_sq = torch.zeros((), dtype=torch.float32, device=A.device)
        for start in range(0, numel, cols_per_chunk):
            c = min(cols_per_chunk, numel - start)
            if view is not None:
                G = view[:, start : start + c]  # [E_loc, c], strided into the grad buffer
            else:
                G = self._buffer("G", e * c, dtype).view(e, c)  # [E_loc, c]
                cols = [g.view(-1)[start : start + c] for g in grads]
                torch.stack(cols, out=G)  # one kernel, not E_loc copies
            if self.ep_size == 1:
                mixed = self._buffer("out", E * c, dtype).view(E, c)
                torch.mm(A, G, out=mixed)  # [E, c]
            else:
                partial = self._buffer("out", E * c, dtype).view(E, c)
                torch.mm(A, G, out=partial)  # A[:, L_r] G_{L_r}, [E, c]
                mixed = self._buffer("rs", e * c, dtype).view(e, c)  # [E_loc, c]
                dist.reduce_scatter_tensor(mixed, partial, group=self.groups.ep)
            flat = mixed.view(-1)
            out_sq += torch.dot(flat, flat).float()  # BLAS dot: ~2x vector_norm on the CPU
            if low_rank is not None:
                r0 = start // f
                rows = mixed.view(e, c // f, f)  # [E_loc, rows, f]
                rows.baddbmm_(L[:, r0 : r0 + c // f], R)
            if view is not None:
                G.copy_(mixed)
            else:
                torch._foreach_copy_(cols, list(mixed.unbind(0)))  # one fused copy back
        return out_sq

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat workspace of at least ``numel`` elements, reused across layers and steps."""
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            device = self.prototypes.device
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._workspace[name] = buf
        return buf[:numel]

    def _repulsion_factors(self, index: int, geo: LayerGeometry, rows: _ExpertBank):
        """phi_rep = L R for this rank's experts (§7): L [E_loc, d, 2n], R [E_loc, 2n, f], rows
        in ``rows``' order (the fc2 gradients' bank, which the low-rank term is added to)."""
        u_all = self.prototypes[index]
        w2, _ = self._fc2_weights(index, rows)  # [E_loc, d, f]
        return stein.repulsion_factors(
            w2,
            u_all[self.local].index_select(0, rows.index),
            geo.V[self.local].index_select(0, rows.index),
            tau=geo.tau,
            iters=self.cfg.power_iters,
            u_all=u_all,
            kernel=self.cfg.kernel,
        )

    def _sum_over_ep(self, value: torch.Tensor) -> torch.Tensor:
        """Sum statistics over the EP group (one collective per step, not per layer)."""
        if self.ep_size == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, group=self.groups.ep)
        return value

    def _repulsion_prescale(self, ddp_model) -> float:
        """1 / (what the expert-gradient reduction multiplies a replicated addend by).

        megatron scales each rank's expert grads by the buffer's ``gradient_scaling_factor`` s
        and sums over the expert-data-parallel group (size edp): an addend x present on every
        replica becomes s * edp * x.
        """
        buffers = getattr(ddp_model, "expert_parallel_buffers", None) or []
        if not buffers:
            return 1.0
        s = buffers[0].gradient_scaling_factor
        edp = dist.get_world_size(self.groups.expert_dp)
        return 1.0 / (s * edp)

    # ---------------------------------------------------------------- prototypes (§4)
    def _bank(self, index: int, kind: str, params: list, read) -> _ExpertBank:
        """The cached layout of ``read(p)`` for layer ``index``'s expert parameters ``params``
        (``expert_bank_view``); one ``read`` per call while the tensors stay where they were."""
        address = read(params[0]).data_ptr()
        bank = self._banks.get((index, kind))
        if bank is not None and bank.address == address:
            return bank
        tensors = [read(p) for p in params]
        found = expert_bank_view(tensors)
        order = tuple(range(len(tensors))) if found is None else found[1]
        index_t = torch.tensor(order, dtype=torch.long, device=tensors[0].device)
        e = len(tensors)
        bank = _ExpertBank(
            tensors=tensors,
            view=None if found is None else found[0],
            order=order,
            index=index_t,
            a_rows=torch.cat([index_t + r * e for r in range(self.ep_size)]),
            a_cols=index_t + self.groups.ep_rank * e,
            address=address,
        )
        self._banks[(index, kind)] = bank
        return bank

    def _fc2_weights(
        self, index: int, rows: _ExpertBank | None = None
    ) -> tuple[torch.Tensor, _ExpertBank]:
        """This rank's fc2 weights of layer ``index`` as [E_loc, d, f], row k = local expert
        ``rows.order[k]`` (default: the weights' own order), and that ``rows``.

        A strided view of megatron's param buffer where it holds them at a uniform stride in
        that order (the distributed optimizer's layout: the grad buffer's order), else a stacked
        copy.
        """
        bank = self._bank(index, "fc2.weight", self._expert_params[index][1], expert_layout.weight)
        rows = bank if rows is None else rows
        if bank.view is not None and bank.order == rows.order:
            return bank.view, rows
        return torch.stack([bank.tensors[i] for i in rows.order]), rows

    def _gather_prototypes(self, local: list[torch.Tensor]) -> torch.Tensor:
        """[L] x [E_loc, d] local rows -> [L, E, d] on every rank (one EP all-gather)."""
        stacked = torch.stack(local).float().contiguous()  # [L, E_loc, d]
        if self.ep_size == 1:
            return stacked
        L, e, d = stacked.shape
        out = torch.empty(
            (self.ep_size * L, e, d), dtype=stacked.dtype, device=stacked.device
        )  # [EP*L, E_loc, d]
        dist.all_gather_into_tensor(out, stacked, group=self.groups.ep)
        out = out.view(self.ep_size, L, e, d)
        return out.permute(1, 0, 2, 3).reshape(L, self.ep_size * e, d)  # [L, E, d]

    def _initial_prototypes(self, index: int) -> torch.Tensor:
        """Layer `index`'s local rows of `stein.init_prototypes` (seed `seed + index`, §4)."""
        w2 = torch.stack([w.detach() for w in self._expert_params[index][1]])  # [E_loc, d, f]
        return stein.init_prototypes(
            w2, seed=self.seed + index, experts=self.local, num_experts=self.num_experts
        )

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Refresh the prototypes from the updated fc2 weights (warm-started, §4); reset C."""
        local = []
        for i in range(len(self.layers)):
            w2, rows = self._fc2_weights(i)
            fresh = stein.refresh_prototypes(  # row k: local expert rows.order[k]
                w2, self.prototypes[i, self.local].index_select(0, rows.index),
                iters=self.cfg.power_iters,
            )
            local.append(torch.empty_like(fresh).index_copy_(0, rows.index, fresh))  # local order
        self.prototypes = self._gather_prototypes(local)
        self.reset_statistics()

    def snapshot_anchor(self) -> None:
        """U_anc <- U (at every actor refresh, §10)."""
        self.anchor = self.prototypes.clone()

    # ---------------------------------------------------------------- diagnostics and state
    def prototype_similarity(self) -> torch.Tensor:
        """Mean |u_i . u_j| over i != j, averaged over layers (a diversity diagnostic, §12)."""
        U = self.prototypes
        E = U.shape[1]
        G = (U @ U.transpose(1, 2)).abs()  # [L, E, E]
        off = G.sum((1, 2)) - torch.diagonal(G, dim1=1, dim2=2).sum(-1)
        return (off / (E * (E - 1))).mean()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Prototypes and anchor (replicated: every rank holds all E rows)."""
        return {"prototypes": self.prototypes.clone(), "anchor": self.anchor.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore prototypes and anchor (valid under any EP size: they are full [L, E, d])."""
        for key in ("prototypes", "anchor"):
            if tuple(state[key].shape) != tuple(self.prototypes.shape):
                raise ValueError(
                    f"checkpoint {key} has shape {tuple(state[key].shape)}, the model needs "
                    f"{tuple(self.prototypes.shape)} (layers, experts, hidden)"
                )
        self.prototypes = state["prototypes"].float().clone()
        self.anchor = state["anchor"].float().clone()

