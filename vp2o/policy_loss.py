"""The policy loss of one micro-batch on the learner's model (method §1-§2, GRPO and VP2O alike),
with what it reads beside the batch: router replay (R3), the actors' gates filled from this forward,
the reference policy's log-probs (KL), the engine-mismatch correction, and the learner's routing
when the post-update check reads this forward (``capture``).

:class:`PolicyLoss` is ``training.forward_backward``'s loss function.
:class:`vp2o.learner.Learner` holds one and runs a copy with ``capture``/``fill_gates`` set for
each forward/backward. Benchmarks and tests build one on a bare model (no session, optimizer or
transform).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vp2o.algo import grpo, mismatch
from vp2o.config import Config
from vp2o.mcore import packing, router_replay
from vp2o.rollout import RolloutBatch, replay_indices, sequence_logprobs
from vp2o.rollout.routing import routing_in_batch_layout

# How the learner's own per-micro-batch statistics combine over micro-batches and data-parallel
# ranks (``reduce_stats``); the policy loss declares its keys in ``grpo.POLICY_LOSS_STATS``.
# policy/entropy: -log pi of the sampled tokens; mismatch/*, correction/*: engine vs learner.
LEARNER_STATS = {"policy/entropy": "token_mean", **mismatch.MISMATCH_STATS}


def clip_options(cfg) -> dict:
    """``grpo.policy_loss``'s clip arguments: the ratio bounds and the dual clip
    (``loss.clip_ratio_c``) when the loss clips (``Config.loss_clips``), all None otherwise, so
    no clip option reaches an unclipped (e.g. VP2O's default) loss."""
    if not cfg.loss_clips:
        return {"clip_low": None, "clip_high": None, "clip_ratio_c": None}
    loss = cfg.loss
    return {"clip_low": loss.clip_low, "clip_high": loss.clip_high,
            "clip_ratio_c": loss.clip_ratio_c}


def in_batch_layout(batch: RolloutBatch, mb: dict, per_layer: list[torch.Tensor],
                     fill: float) -> torch.Tensor:
    """Per-layer router rows [T, k] of this micro-batch's forward as [Lm, b, S, k] (``fill``
    at pads), padded or packed micro-batch alike."""
    b, width = batch.tokens.shape
    if not mb.get("packed"):
        return routing_in_batch_layout(per_layer, b, width)
    rows, cols = packing.packed_layout(batch.valid)  # packed token t -> (rows[t], cols[t])
    packed = torch.stack(per_layer)  # [Lm, T, k]
    out = packed.new_full((len(per_layer), b, width, packed.shape[-1]), fill)
    out[:, rows, cols] = packed
    return out


def _nothing() -> None:
    return None


@dataclass
class PolicyLoss:
    """``(model, micro-batch) -> (loss, detached stats)`` for ``training.forward_backward``.

    Attributes:
        cfg: the run's config (loss, rollout.router_replay, loss_correction).
        model: the policy; router replay addresses its routers.
        moe_layers: its VP2O MoE layers (``vp2o_moe.moe_layers``), whose routers report this
            forward's routing (``capture``) and the gates at the actors' experts
            (``fill_gates``); empty when neither is used.
        ref_model: the frozen reference policy for the KL term, or None.
        capture_specialisation: called after each forward (the Stein transform keeps the
            specialisation losses' gradients apart when ``vp2o.transport_specialisation`` is off).
        capture: also return the learner's routing of this forward, ``_ids``/``_gates``
            [Lm, b, S, k] (the post-update check's D, §10).
        fill_gates: also return the routers' gates at the actors' experts, ``_actor_gates``
            (a batch whose engine returned routed experts' ids only).
    """

    cfg: Config
    model: torch.nn.Module
    moe_layers: list = field(default_factory=list)
    ref_model: torch.nn.Module | None = None
    capture_specialisation: Callable[[], None] = _nothing
    capture: bool = False
    fill_gates: bool = False

    def __call__(self, model: torch.nn.Module, mb: dict) -> tuple[torch.Tensor, dict]:
        """Policy loss of one micro-batch (``experience.micro_batches``); returns (loss,
        detached stats)."""
        cfg, batch = self.cfg, mb["batch"]
        # Packed micro-batches (train.max_tokens_per_microbatch) run one row of real tokens.
        logprobs = packing.packed_logprobs if mb.get("packed") else sequence_logprobs
        # the actors' gates at their experts, from this forward (fill_gates)
        routers = [layer.router for layer in self.moe_layers] if self.fill_gates else []
        if cfg.rollout.router_replay or routers:  # the actors' ids, megatron's token order
            actor_ids = replay_indices(packing.packed_routing_ids(batch) if mb.get("packed")
                                       else batch.routing_ids)
        if cfg.rollout.router_replay:
            router_replay.replay(self.model, actor_ids)
        if routers:
            for router, layer_ids in zip(routers, actor_ids, strict=True):
                router.gates_for = layer_ids
        temperature = batch.logprob_temperature
        logp = logprobs(model, batch, temperature=temperature)  # [b, S]
        actor_gates = (in_batch_layout(batch, mb, [r.given_gates for r in routers], 0.0)
                       if routers else None)
        self.capture_specialisation()  # vp2o.transport_specialisation=false only
        logp_ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                logp_ref = logprobs(self.ref_model, batch, temperature=temperature)
        loss_cfg = cfg.loss
        # Engine mismatch (docs/rollout.md): with a correction the ratio is taken against the
        # learner's own log-probs at the rollout weights (this forward: one update per batch)
        # and each token's term is weighted by TIS/MIS of learner vs engine.
        logp_old, weights, fixes = batch.behavior_logprobs, None, {}
        if cfg.loss_correction != "none":
            # the rollout weights' log-probs: this forward's at the first update, the first
            # update's (PendingBatch.rollout_logprobs) on a reused batch
            logp_old = mb.get("logp_rollout", logp.detach())
            weights, fixes = mismatch.correction_weights(
                logp_old, batch.behavior_logprobs, batch.response_mask,
                method=cfg.loss_correction, tis_cap=loss_cfg.tis_cap, mis_low=loss_cfg.mis_low,
                mis_high=loss_cfg.mis_high, mis_level=loss_cfg.mis_level)
        loss, stats = grpo.policy_loss(
            logp, logp_old, mb["adv"], batch.response_mask,
            **clip_options(cfg), aggregation=loss_cfg.aggregation,
            pg_estimator=loss_cfg.estimator, logp_ref=logp_ref, kl_coeff=loss_cfg.kl_coeff,
            kl_estimator=loss_cfg.kl_estimator,
            denominator=mb["denominator"], token_weights=weights,
        )
        stats.update(mismatch.mismatch_stats(logp, batch.behavior_logprobs, batch.response_mask))
        stats.update(fixes)
        stats = {k: v.detach() for k, v in stats.items()}
        mask = batch.response_mask
        stats["_tokens"] = mask.sum()  # the weight of this micro-batch's token means
        stats["policy/entropy"] = grpo.masked_mean(-logp.detach(), mask)
        stats["_logp"] = logp.detach()
        if self.capture:  # the learner's routing of this forward, [Lm, b, S, k] (§10's D)
            recs = [layer.router.last_routing for layer in self.moe_layers]
            stats["_ids"] = in_batch_layout(batch, mb, [r.ids for r in recs], -1)
            stats["_gates"] = in_batch_layout(batch, mb, [r.gates for r in recs], 0.0)
        if actor_gates is not None:
            stats["_actor_gates"] = actor_gates
        return loss, stats
