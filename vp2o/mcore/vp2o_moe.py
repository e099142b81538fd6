"""The VP2O MoE layer: megatron-core's router and MoE layer, extended through its layer specs.

- :class:`VP2ORouter` (a ``TopKRouter``) accumulates, per optimizer step, the co-activation
  counts ``r^T r`` of its layer (method §3) from grad-enabled forwards only (with activation
  recompute the first forward runs without grad, the recompute with grad: counted once), keeps the
  top-k ids and gates of the last no-grad forward (the learner's gates for §10, the actors' logged
  gates at generation), and adds the routing-variance loss (§9) the way megatron adds its
  load-balancing loss (``MoEAuxLossAutoScaler`` + the aux-loss tracker).
- :class:`VP2OMoELayer` (a ``MoELayer``) adds the expert orthogonality loss (§9) on the experts'
  raw outputs, rebuilt in token order from the combined rows before megatron sums them.

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
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from vp2o.algo import specialization
from vp2o.config import Config


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
        self.valid_rows: torch.Tensor | None = None
        self.record_routing = True
        self.last_routing: RoutingRecord | None = None

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None, **kwargs):
        """megatron's top-k routing, then VP2O's statistics and routing-variance loss."""
        probs, routing_map = super().routing(logits, padding_mask=padding_mask, **kwargs)
        flat_logits = logits.view(-1, self.config.num_moe_experts)  # [T, E]
        k = self.topk
        # [T] bool, False at padding tokens (the MoE layer's orthogonality loss reads it too).
        self.valid_rows = None if padding_mask is None else ~padding_mask.reshape(-1)
        if self.record_routing and not torch.is_grad_enabled():
            # Only no-grad forwards are read back (generation, the post-update check of §10):
            # the learner's grad-enabled forwards skip the top-k/sort/gather.
            gates, ids = torch.topk(
                probs.detach().float().masked_fill(~routing_map, -1.0), k, dim=-1
            )
            ids, order = torch.sort(ids, dim=-1)  # [T, k] ascending expert ids
            self.last_routing = RoutingRecord(ids=ids, gates=torch.gather(gates, 1, order))
        if torch.is_grad_enabled():
            with torch.no_grad():
                self._accumulate_statistics(flat_logits, routing_map, padding_mask)
            if self.training and self.variance_coeff > 0:
                # Post-top-k scores renormalised to sum to 1 per token (method §9).
                p = probs if self.valid_rows is None else probs[self.valid_rows]  # [T, E]
                loss = specialization.routing_variance_loss(p, renormalize=True)
                probs = self.attach_and_log_load_balancing_loss(
                    probs,
                    self.variance_coeff,
                    self.variance_coeff * loss,
                    "routing_variance_loss",
                    self.tp_cp_group,
                )
        return probs, routing_map

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
    computed from y and g with the gates folded into [T, k] scalars
    (``specialization.orthogonality_loss(..., scale=g)``), as a function of the expert weights;
    y and g share the graph, so the gate's two paths cancel and no gradient reaches the router.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ortho_coeff = 0.0
        self.ortho_normalize = True

    def postprocess(self, output: torch.Tensor, shared_expert_output: torch.Tensor | None):
        """Attach the orthogonality loss, then megatron's unpermute + shared-expert add."""
        if self.ortho_coeff > 0 and self.training and torch.is_grad_enabled():
            y, gates = self._outputs_in_token_order(output)  # [T, k, d], [T, k]
            if self.router.valid_rows is not None:
                y, gates = y[self.router.valid_rows], gates[self.router.valid_rows]  # no pads
            # The loss of the raw outputs x~ = y / g, without dividing [T, k, d] (§9).
            loss = specialization.orthogonality_loss(
                y, normalize=self.ortho_normalize, scale=gates
            )
            num_layers = self.config.num_layers
            save_to_aux_losses_tracker(
                "expert_orthogonality_loss",
                loss.detach(),
                self.layer_number,
                num_layers,
                reduce_group=self.router.tp_cp_group,
            )
            output = MoEAuxLossAutoScaler.apply(output, self.ortho_coeff * loss)
        return super().postprocess(output, shared_expert_output)

    def _outputs_in_token_order(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T*k, d] combined rows (expert-grouped) -> ([T, k, d] rows, [T, k] gates), by token."""
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
        token_of_row = disp.reversed_local_input_permutation_mapping  # [T*k]
        # Stable sort by token keeps ascending expert ids within each token.
        order = torch.argsort(token_of_row, stable=True)
        # The same token-major, expert-ascending order as a row-major mask read. The gates stay
        # in the graph: y = g x~ depends on g, and the loss of y / g does not, so the two gate
        # paths cancel and no gradient reaches the router.
        gates = probs.masked_select(routing_map).to(rows.dtype)  # [T*k]
        y = _PermuteRows.apply(rows, order).view(num_tokens, k, rows.shape[-1])
        return y, gates.view(num_tokens, k)


class _PermuteRows(torch.autograd.Function):
    """``x[order]`` for a permutation ``order``, with the backward as a gather by the inverse
    permutation instead of autograd's accumulating index_put (serial on the CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return grad.index_select(0, inverse), None


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
