"""The VP2O MoE layer: megatron-core's router and MoE layer, extended through its layer specs.

- :class:`VP2ORouter` (a ``TopKRouter``) accumulates, per optimizer step, the co-activation
  counts ``r^T r`` of its layer (method §3) from grad-enabled forwards only (with activation
  recompute the first forward runs without grad, the recompute with grad: counted once), keeps the
  top-k ids and gates of the last no-grad forward (the learner's gates for §10, the actors' logged
  gates at generation), and adds the routing-variance loss (§9) the way megatron adds its
  load-balancing loss (``MoEAuxLossAutoScaler`` + the aux-loss tracker).
- :class:`VP2OMoELayer` (a ``MoELayer``) adds the expert orthogonality loss (§9) on the experts'
  raw outputs, from each token's Gram matrix of the combined rows, and sums those rows itself
  in token order (megatron's unpermute, without a second permutation).

Installed with :func:`vp2o_layer_spec_hook` as ``build_model(cfg, layer_spec_hook=...)``; no
megatron-core file is edited. Process groups come from the modules megatron built
(``router.tp_cp_group``), as megatron's own aux losses use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from vp2o.algo import specialization
from vp2o.config import Config


class _ReplayOf(RouterReplay):
    """A megatron ``RouterReplay`` that replays the given ids [T, k] in one routing call, built
    by megatron's own methods, and kept out of megatron's process-wide list of replays (which
    ``RouterReplay.set_replay_data`` and friends address by position: one more entry there
    would shift every layer's replay)."""

    def __init__(self, ids: torch.Tensor) -> None:
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)  # no __eq__: by identity
        self.set_target_indices(ids)
        self.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


@dataclass
class RoutingRecord:
    """One forward's routing of a layer. T local tokens in megatron order (row s*B + b).

    Attributes:
        ids: [T, k] int64 selected expert ids (ascending expert id order within a row).
        gates: [T, k] float32 gate values of those experts, as passed to the experts.
    """

    ids: torch.Tensor
    gates: torch.Tensor


class VP2ORouter(TopKRouter):
    """TopKRouter + co-activation statistics, routing records and the routing-variance loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        num_experts = self.config.num_moe_experts
        # Per-step accumulators (fp32, method §3), reset by reset_step_statistics().
        self.register_buffer(
            "coactivation_counts",
            torch.zeros(num_experts, num_experts, dtype=torch.float32, device=self.weight.device),
            persistent=False,
        )
        self.register_buffer(
            "routed_tokens", torch.zeros((), dtype=torch.float32, device=self.weight.device),
            persistent=False,
        )
        self.register_buffer(
            "entropy_sum", torch.zeros((), dtype=torch.float32, device=self.weight.device),
            persistent=False,
        )
        self.variance_coeff = 0.0
        self.live_losses: list[torch.Tensor] | None = None  # SteinTransform fills and empties it
        self.valid_rows: torch.Tensor | None = None
        self.record_routing = True
        self.record_with_grad = False  # the learner sets it for a forward that also checks (§10)
        self.last_routing: RoutingRecord | None = None
        self.gates_for: torch.Tensor | None = None  # [T, k] ids whose gates the next forward keeps
        self.given_gates: torch.Tensor | None = None  # ... in here, [T, k] float32 (gates_at)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None, **kwargs):
        """megatron's top-k routing, then VP2O's statistics and routing-variance loss."""
        probs, routing_map = super().routing(logits, padding_mask=padding_mask, **kwargs)
        flat_logits = logits.view(-1, self.config.num_moe_experts)  # [T, E]
        if self.gates_for is not None:  # the actors' experts' gates (§10), once per forward
            self.given_gates, self.gates_for = self.gates_at(flat_logits, self.gates_for), None
        k = self.topk
        # [T] bool, False at padding tokens (the MoE layer's orthogonality loss reads it too).
        self.valid_rows = None if padding_mask is None else ~padding_mask.reshape(-1)
        if self.record_routing and (self.record_with_grad or not torch.is_grad_enabled()):
            # Read back from no-grad forwards (generation, the post-update check of §10) and
            # from a training forward that stands in for that check (record_with_grad); other
            # grad-enabled forwards skip the top-k/sort/gather.
            gates, ids = torch.topk(
                probs.detach().float().masked_fill(~routing_map, -1.0), k, dim=-1
            )
            ids, order = torch.sort(ids, dim=-1)  # [T, k] ascending expert ids
            self.last_routing = RoutingRecord(ids=ids, gates=torch.gather(gates, 1, order))
        if torch.is_grad_enabled():
            with torch.no_grad():
                self._accumulate_statistics(flat_logits, routing_map, padding_mask)
            if self.training and self.variance_coeff > 0:
                # Post-top-k scores renormalised to sum to 1 per token (method §9), over the
                # real tokens (a mask, not a selection: no host sync).
                loss = self.variance_coeff * specialization.routing_variance_loss(
                    probs, renormalize=True, mask=self.valid_rows
                )
                if self.live_losses is not None:
                    self.live_losses.append(loss)
                probs = self.attach_and_log_load_balancing_loss(
                    probs,
                    self.variance_coeff,
                    loss,
                    "routing_variance_loss",
                    self.tp_cp_group,
                )
        return probs, routing_map

    @torch.no_grad()
    def gates_at(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The gates this router gives the experts ``ids`` [T, k] (another routing's choice: the
        actors', whose gates §10 weighs them by) on ``logits`` [T, E]: megatron's own top-k
        routing function replaying ``ids`` (what router replay does inside a forward), beside
        this forward's routing, which it leaves alone. Returns [T, k] float32 in the order of
        ``ids``; token dropping (``moe_expert_capacity_factor``) is not applied."""
        given = _ReplayOf(ids.to(logits.device))
        cfg = self.config
        probs, _ = topk_routing_with_score_function(
            logits.detach(), self.topk, use_pre_softmax=cfg.moe_router_pre_softmax,
            num_groups=cfg.moe_router_num_groups, group_topk=cfg.moe_router_group_topk,
            scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=self.score_function, expert_bias=self.expert_bias, fused=False,
            router_replay=given,
        )  # [T, E], nonzero at ids
        return probs.gather(1, given.target_topk_idx).float()

    def _accumulate_statistics(self, logits, routing_map, padding_mask) -> None:
        """C += r^T r (§3), the routed-token count and the router-entropy sum (§12 diagnostics).

        Each token is weighted by the fraction of its k selections kept (1 without padding or
        token dropping; 0 for padding), so ``entropy_sum / routed_tokens`` is the mean entropy
        over routed tokens of the renormalised router scores.
        """
        r = routing_map.float()  # [T, E]
        exact_k = padding_mask is None and self.config.moe_expert_capacity_factor is None
        weight = None  # [T], None = all ones (every token keeps its k experts)
        if padding_mask is not None:  # True = pad: padding tokens are no data
            r = r * (~padding_mask.reshape(-1, 1)).float()
        if not exact_k:
            weight = r.sum(-1) / self.topk
        self.coactivation_counts.addmm_(r.t(), r)  # += r^T r
        self.routed_tokens += r.shape[0] if weight is None else weight.sum()
        logits = logits.float()  # [T, E]
        if self.score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            log_scores = (scores / scores.sum(-1, keepdim=True)).clamp_min(1e-20).log()
        else:
            log_scores = torch.log_softmax(logits, dim=-1)
        token_entropy = -(log_scores.exp() * log_scores).sum(-1)  # [T]
        self.entropy_sum += (token_entropy if weight is None else token_entropy * weight).sum()

    def reset_step_statistics(self) -> None:
        """Zero the per-step accumulators (after the optimizer step consumed them)."""
        self.coactivation_counts.zero_()
        self.routed_tokens.zero_()
        self.entropy_sum.zero_()


class VP2OMoELayer(MoELayer):
    """MoELayer + the expert orthogonality loss on raw expert outputs in token order (§9).

    With the alltoall dispatcher, ``postprocess`` receives the experts' outputs after the combine
    all-to-all and before megatron's unpermute sums them: one row per (token, selected expert),
    grouped by expert, tokens ascending within an expert. The rows are gate-weighted (megatron
    multiplies by the gate inside the expert MLP): y = g x~. The loss of the raw outputs x~ is
    computed from each token's Gram matrix of its y rows (``specialization.per_token_gram`` of
    the rows read token-major, ``specialization.token_major_rows``) and the gates folded into
    [T, k] scalars (``specialization.orthogonality_loss_from_gram(..., scale=g)``), as a function
    of the expert weights; y and g share the graph, so the gate's two paths cancel and no
    gradient reaches the router. The same token-major rows summed over k are the layer's output
    (what megatron's unpermute computes), unless megatron's combine has more to do (the shared
    expert's overlap, the fused permute, a latent projection).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ortho_coeff = 0.0
        self.ortho_normalize = True
        self.live_losses: list[torch.Tensor] | None = None  # SteinTransform fills and empties it

    def postprocess(self, output: torch.Tensor, shared_expert_output: torch.Tensor | None):
        """Attach the orthogonality loss, then sum each token's rows (megatron's unpermute) and
        add the shared experts' output."""
        if not (self.ortho_coeff > 0 and self.training and torch.is_grad_enabled()):
            return super().postprocess(output, shared_expert_output)
        x, gates = self._token_major_rows(output)  # [T, k, d], [T, k]
        # The loss of the raw outputs x~ = y / g, without dividing [T, k, d] (§9), over the
        # real tokens (a mask, not a selection: no host sync).
        loss = specialization.orthogonality_loss_from_gram(
            specialization.per_token_gram(x),  # [T, k, k]
            normalize=self.ortho_normalize,
            scale=gates,
            mask=self.router.valid_rows,
        )
        save_to_aux_losses_tracker(
            "expert_orthogonality_loss",
            loss.detach(),
            self.layer_number,
            self.config.num_layers,
            reduce_group=self.router.tp_cp_group,
        )
        if self.live_losses is not None:
            self.live_losses.append(self.ortho_coeff * loss)
        if not self._sums_rows_itself():
            output = MoEAuxLossAutoScaler.apply(output, self.ortho_coeff * loss)
            return super().postprocess(output, shared_expert_output)
        # megatron's unpermute scatter-adds the expert-grouped rows into token order; the loss
        # already read them token-major, so the sum over k gives the same [T, d] without a
        # second pass over the [T*k, d] rows each way (a scatter forward, a gather backward):
        # memory-bound copies, ~3 % of VP2O's step at bench_step's top-8 d=1024 shape on a CPU
        # (docs/benchmarks.md).
        combined = MoEAuxLossAutoScaler.apply(x.sum(1), self.ortho_coeff * loss)  # [T, d]
        combined = combined.view(self.token_dispatcher.hidden_shape)
        if shared_expert_output is not None:
            combined = combined + shared_expert_output
        return combined

    def _sums_rows_itself(self) -> bool:
        """Whether megatron's combine is only the sum of each token's rows here: not with the
        shared expert overlapped in the dispatcher, the fused (transformer-engine) unpermute or
        a latent projection after the combine."""
        return (
            self.token_dispatcher.shared_experts is None
            and not self.config.moe_permute_fusion
            and not self.config.moe_latent_size
        )

    def _token_major_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T*k, d] combined rows (expert-grouped) -> (the rows token-major [T, k, d], gates
        [T, k]), experts ascending within a token."""
        disp = self.token_dispatcher
        if not isinstance(disp, MoEAlltoAllTokenDispatcher):
            raise RuntimeError(
                "vp2o.ortho_coeff > 0 needs model.moe_token_dispatcher_type=alltoall "
                f"(got {type(disp).__name__})"
            )
        routing_map = disp.routing_map  # [T, E] bool
        probs = disp.probs  # [T, E] gates (zero outside top-k)
        num_tokens = routing_map.shape[0]
        k = self.router.topk
        if rows.shape[0] != num_tokens * k:
            raise RuntimeError(
                f"vp2o.ortho_coeff > 0 needs every token routed to exactly top-k = {k} experts; "
                f"got {rows.shape[0]} expert rows for {num_tokens} tokens (token dropping, "
                "moe_expert_capacity_factor, is not supported with the orthogonality loss)"
            )
        ids, order, dest = token_major_layout(
            disp.reversed_local_input_permutation_mapping, routing_map.sum(0), k
        )
        # The gates in the same order. They stay in the graph: y = g x~ depends on g, and the
        # loss of y / g does not, so the two gate paths cancel and no gradient reaches the router.
        gates = probs.gather(1, ids).to(rows.dtype)  # [T, k]
        return specialization.token_major_rows(rows, order, dest, k), gates


def token_major_layout(
    token_of_row: torch.Tensor, rows_per_expert: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's experts, and where megatron's expert-grouped rows sit in token order.

    megatron's permutation (no token dropping) emits the rows grouped by expert, experts
    ascending, tokens ascending within an expert; its dispatcher keeps each row's token
    (``reversed_local_input_permutation_mapping``). A stable sort by token therefore gives the
    token-major order with each token's experts ascending. No data-dependent shapes:
    ``masked_select``/``nonzero`` would wait for the device on accelerators.

    Args:
        token_of_row: [T*k] the token of each row (megatron's mapping).
        rows_per_expert: [E] rows of each expert (``routing_map.sum(0)``).
        k: top-k.

    Returns:
        ``ids`` [T, k] each token's experts, ascending; ``order`` [T*k]: the row of token t's
        j-th expert at ``t*k + j`` (``rows[order]`` is token-major); ``dest`` [T*k]: the inverse
        permutation (the token-major position of row r).
    """
    n = token_of_row.numel()
    order = torch.argsort(token_of_row, stable=True)  # [T*k]
    dest = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
    experts = torch.arange(rows_per_expert.numel(), device=order.device)
    expert_of_row = torch.repeat_interleave(experts, rows_per_expert, output_size=n)  # [T*k]
    ids = expert_of_row[order].view(-1, k)  # [T, k]
    return ids, order, dest


def vp2o_layer_spec_hook(cfg: Config):
    """Layer-spec hook for ``build_model``: VP2O router + MoE layer on every MoE layer."""

    def hook(spec, layer_number: int):
        mlp = spec.submodules.mlp
        if getattr(mlp, "module", None) is not None and issubclass(mlp.module, MoELayer):
            mlp.module = VP2OMoELayer
            mlp.submodules.router = VP2ORouter
        return spec

    return hook


def moe_layers(model) -> list[VP2OMoELayer]:
    """This rank's VP2O MoE layers in layer order."""
    return [m for m in model.modules() if isinstance(m, VP2OMoELayer)]


def configure_losses(
    model, *, ortho_coeff: float, variance_coeff: float, ortho_normalize: bool = True
) -> None:
    """Set the specialisation-loss coefficients on every VP2O layer (0 disables a loss)."""
    for layer in moe_layers(model):
        layer.ortho_coeff = ortho_coeff
        layer.ortho_normalize = ortho_normalize
        layer.router.variance_coeff = variance_coeff
