"""The learner of the RL loop: forward/backward of the policy loss (``vp2o.policy_loss``), one
optimizer step, and VP2O's post-update check.

    learner = Learner(session)              # after the weights are loaded (prototypes read them)
    grads = learner.gradients(pending)      # forward/backward, [VP2O: Stein transform]
    update = learner.step(pending, grads)   # optimizer step, prototype refresh
    check = learner.check(pending, update, more_updates=...)  # §11 drift/ESS, §10 anchor D
    learner.undo()                          # §10 rollback of a rejected step

The two halves are apart so that a VP2O update that another may follow is checked in that one's
forward (``gradients(p, capture=True)``, then ``check(..., after=...)``;
``vp2o.check_in_next_forward``); gradients the check leaves unstepped go through ``discard``.

Nothing here reaches into megatron's optimizer: the rollback lives in ``vp2o.mcore.optim_state``,
the step plumbing in ``vp2o.mcore.training``. Host-device syncs are marked ``# sync``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from vp2o.algo import grpo, trust_region
from vp2o.diagnostics import routing_diagnostics
from vp2o.experience import PendingBatch, in_batch_order, micro_batches
from vp2o.mcore import optim_state, router_replay, training
from vp2o.mcore.model import build_model
from vp2o.mcore.parallel import gather_over_data_ranks, reduce_stats
from vp2o.mcore.stein_step import SteinTransform
from vp2o.mcore.vp2o_moe import vp2o_layer_spec_hook
from vp2o.policy_loss import LEARNER_STATS, PolicyLoss
from vp2o.rollout import RolloutBatch, sequence_logprobs
from vp2o.rollout.logprobs import scoring
from vp2o.rollout.routing import routing_in_batch_layout
from vp2o.session import Session, load_initial_weights

SPECULATE_ABOVE = 2 / 3
"""``vp2o.check_in_next_forward`` runs the next update's forward/backward before the check of
update k when more than this share of the batches that reached update k went on past it: reading
the check there saves a forward F when the batch continues and wastes a backward B ~ 2F when it
ends, so it pays when p F > (1 - p) B, i.e. p > B / (F + B) ~ 2/3."""

@dataclass
class Update:
    """What one learner step did.

    Attributes:
        finite: the step was taken (loss and gradients finite on every rank).
        metrics: its logged values.
        logp_before: [N, S] the learner's log-probs before the step (the loss's forward).
    """

    finite: bool
    metrics: dict
    logp_before: torch.Tensor


@dataclass
class Gradients:
    """One update's forward/backward, before its optimizer step (:meth:`Learner.gradients`).

    Attributes:
        losses: [micro-batches] the policy loss of each (their finiteness decides the step).
        metrics: the step's loss statistics (reduced over micro-batches and ranks).
        seconds: wall time of the forward/backward (and the transform).
        logp: [N, S] the learner's log-probs at these weights (the loss's forward).
        routing: the learner's routing at these weights, ids and gates [Lm, N, S, k] (only
            with ``capture``).
        transform_stats: what the transform (or the routing statistics) returned.
        transform_s: its wall time.
    """

    losses: torch.Tensor
    metrics: dict
    seconds: float
    logp: torch.Tensor
    routing: tuple[torch.Tensor, torch.Tensor] | None
    transform_stats: dict
    transform_s: float


class Learner:
    """Loss, step, trust region and rollback for one rank. Holds no hidden global state.

    Build it after the weights are loaded: the prototypes (§4) are read from them.
    """

    def __init__(self, s: Session) -> None:
        self.s, self.cfg = s, s.cfg
        self.vp2o = s.cfg.algorithm == "vp2o"
        self.transform = SteinTransform(
            s.model, s.cfg.vp2o, s.groups, num_experts=s.cfg.model.num_experts,
            seed=s.cfg.seed, transport=self.vp2o,
        )
        self.ref_model = reference_model(s) if s.cfg.loss.kl_coeff > 0 else None
        self.rollback = (optim_state.Rollback(s.model, s.optimizer)
                         if self.vp2o and s.cfg.vp2o.trust_region.on_violation == "rollback"
                         else None)
        self._saved_transform: dict | None = None
        self._transform_stats: dict = {}
        self._transform_s = 0.0
        self.loss = PolicyLoss(s.cfg, s.model, moe_layers=self.transform.layers,
                               ref_model=self.ref_model,
                               capture_specialisation=self.transform.capture_specialisation)
        self._reached: dict[int, int] = {}  # batches whose update k was checked, by k
        self._continued: dict[int, int] = {}  # ... and went on to update k + 1

    # --------------------------------------------------------------- one step
    def gradients(self, p: PendingBatch, *, capture: bool = False) -> Gradients:
        """Forward/backward over the batch's micro-batches, [VP2O: the Stein transform of the
        expert gradients before their data-parallel reduction]: gradients in the model's
        buffers, no optimizer step yet. ``capture``: also keep what the previous
        update's post-update check needs from this forward (the log-probs are kept anyway; the
        learner's routing), so :meth:`check` need not run a forward of its own."""
        s, cfg = self.s, self.cfg
        training.zero_grads(s.ddp, s.optimizer)
        drop_specialisation_losses()  # megatron's tracker adds to what other forwards left
        t0 = time.perf_counter()
        mbs = micro_batches(p, cfg.rollout.micro_batch_size, s.device,
                            loss_normaliser(p, cfg, s.groups),
                            max_tokens=cfg.train.max_tokens_per_microbatch)
        fill_gates = self.fills_actor_gates(p)
        loss = dataclasses.replace(self.loss, capture=capture, fill_gates=fill_gates)
        routers = [layer.router for layer in self.transform.layers] if capture else []
        for router in routers:
            router.record_with_grad = True
        try:
            outs = training.forward_backward(
                s.ddp,
                mbs,
                loss,
                before_grad_reduction=self._transform_gradients,
            )
        finally:
            for router in routers:
                router.record_with_grad = False
        if fill_gates:  # no actor gates at pads or unrouted positions (-1)
            gates = in_batch_order([o["_actor_gates"] for o in outs], mbs, dim=1).cpu()
            p.batch.routing_gates = gates.masked_fill(p.batch.routing_ids < 0, 0.0)
        if cfg.rollout.router_replay:
            router_replay.stop(s.model)
        m = specialisation_losses(len(outs))
        m.update(reduce_stats(outs, {**grpo.POLICY_LOSS_STATS, **LEARNER_STATS}, s.groups))
        routing = None
        if capture:
            routing = (in_batch_order([o["_ids"] for o in outs], mbs, dim=1).cpu(),
                       in_batch_order([o["_gates"] for o in outs], mbs, dim=1).cpu())
        return Gradients(
            losses=torch.stack([o["loss/policy"] for o in outs]), metrics=m,
            seconds=time.perf_counter() - t0,
            logp=in_batch_order([o["_logp"] for o in outs], mbs).cpu(), routing=routing,
            transform_stats=self._transform_stats, transform_s=self._transform_s,
        )

    def step(self, p: PendingBatch, g: Gradients) -> Update:
        """The optimizer step on the gradients of :meth:`gradients` (the weights must not have
        changed in between) unless a loss or gradient is not finite on some rank; then the
        prototype refresh (§4)."""
        s, cfg = self.s, self.cfg
        t0 = time.perf_counter()
        if self.rollback is not None:  # §10: what a rejected step restores
            self.rollback.save()
            self._saved_transform = self.transform.state_dict()
        m = dict(g.metrics)
        finite = bool(training.grads_finite(s.ddp)) and bool(torch.isfinite(g.losses).all())  # sync
        if finite:
            s.optimizer.step()
        else:
            m["events/skipped_step"] = 1.0
        m["perf/train_s"] = g.seconds + time.perf_counter() - t0
        self.transform.after_optimizer_step()  # prototype refresh (§4); resets routing stats
        p.updates += 1
        m.update(self._transform_metrics(g.transform_stats, g.transform_s))
        if cfg.loss_correction != "none" and finite and p.rollout_logprobs is None:
            # this forward ran at the rollout weights (an earlier skipped step left them so):
            # the correction's reference on the batch's later updates
            p.rollout_logprobs = g.logp
        return Update(finite=finite, metrics=m, logp_before=g.logp)

    def discard(self) -> None:
        """Drop the gradients of the last :meth:`gradients` unstepped (the batch ended after a
        check read their forward): the routing statistics their forwards accumulated go too
        (the buffers are zeroed by the next ``gradients``)."""
        self.transform.reset_statistics()

    def _transform_gradients(self, ddp) -> None:
        """Runs inside ``forward_backward`` after the last backward, before the reduction."""
        t0 = time.perf_counter()
        self._transform_stats = self.transform.before_grad_reduction(ddp)
        self._transform_s = time.perf_counter() - t0

    def _transform_metrics(self, stats: dict, seconds: float) -> dict:
        m = {}
        m["router/entropy"] = stats.get("router/entropy")
        if "C" in stats:
            m.update(routing_diagnostics(stats["C"], self.transform.prototypes,
                                         self.cfg.model.moe_router_topk))
        for key in ("stein/attraction_norm", "stein/repulsion_norm"):
            if key in stats:
                m[key] = stats[key]
        m["perf/transform_s"] = seconds
        return m

    def undo(self) -> None:
        """Roll back the last ``update`` (§10): weights, optimizer state and prototypes."""
        self.rollback.restore()
        self.transform.load_state_dict(self._saved_transform)

    # --------------------------------------------------------------- budgets (§10, §11)
    def check(self, p: PendingBatch, update: Update, *, more_updates: bool,
              after: Gradients | None = None) -> dict:
        """Behaviour of the step just taken, measured at the same point under both algorithms.

        ``behavior/drift`` and ``behavior/ess`` (§11) compare the actors with the learner's
        log-probs *before* this update (the loss's own forward: free, and the same quantity for
        GRPO and VP2O). VP2O also measures the policy *after* the update, which is what its
        budgets decide on: the anchor distance ``trust/anchor_distance`` (§10, when the trust
        region is on) and ``behavior/drift_after``/``behavior/ess_after`` (§11, when another
        update on this batch could follow: ``more_updates``). That costs one forward, skipped
        when neither is needed, and read from ``after`` (the next update's forward on this
        batch, :meth:`gradients` with ``capture``) when it is given."""
        out = self.behaviour(update.logp_before, p.batch)
        trust = self.cfg.vp2o.trust_region.enabled
        if self.vp2o and update.finite and (trust or more_updates):
            if after is not None:
                out.update(self.after_update(p, after.logp, *after.routing, anchor=trust))
            else:
                out.update(self.evaluate_update(p, anchor=trust))
        return out

    def fills_actor_gates(self, p: PendingBatch) -> bool:
        """Whether this batch's actor gates come from the learner's forward: VP2O's §10 anchor
        distance weighs the actors' experts by their gates, and an engine that returns routed
        experts' ids only (CUDA vLLM) leaves them out. The first update's forward runs at the
        rollout weights (the engine was synced to them before generating), so each router
        reports its gates at the actors' experts there (``VP2ORouter.gates_at``: megatron's
        routing function replaying the ids) at the cost of a [T, E] routing per layer; the
        check after the update reads them."""
        batch = p.batch
        return (self.vp2o and self.cfg.vp2o.trust_region.enabled
                and bool(batch.routing_ids.numel()) and not batch.routing_gates.numel())

    def checks_in_next_forward(self, k: int) -> bool:
        """Whether the check of update ``k`` (another may follow on the batch) reads that next
        update's forward (``vp2o.check_in_next_forward``): the training forward must compute
        what the no-grad check would (no dropout, no router replay, no pipeline stages; the
        same values within rounding, tested), and it must be expected to pay: more than
        ``SPECULATE_ABOVE`` of the batches so far went on past update ``k`` (counted from 1 of
        1, so the first batch tries it). Every rank counts the same decisions."""
        cfg = self.cfg
        if not (self.vp2o and cfg.vp2o.check_in_next_forward and not cfg.rollout.router_replay
                and cfg.model.hidden_dropout == 0 and cfg.model.attention_dropout == 0
                and cfg.parallel.pipeline_parallel == 1):
            return False
        went_on = (self._continued.get(k, 0) + 1) / (self._reached.get(k, 0) + 1)
        return went_on > SPECULATE_ABOVE

    def count_continuation(self, k: int, went_on: bool) -> None:
        """Record whether the batch went on past update ``k`` (checks_in_next_forward reads it)."""
        self._reached[k] = self._reached.get(k, 0) + 1
        self._continued[k] = self._continued.get(k, 0) + int(went_on)

    @torch.no_grad()
    def evaluate_update(self, p: PendingBatch, *, anchor: bool = True) -> dict:
        """Log-probs and learner routing after the step, by a no-grad forward of the batch:
        ``behavior/drift_after``, ``behavior/ess_after`` (§11) and, with ``anchor``, D (§10)."""
        cfg, model = self.cfg, self.s.model
        logps, ids, gates = [], [], []
        with scoring(model):  # eval mode, restored after
            for mb in micro_batches(p, cfg.rollout.micro_batch_size, self.s.device):
                b, s = mb["batch"].tokens.shape
                logps.append(sequence_logprobs(model, mb["batch"],
                                               temperature=mb["batch"].logprob_temperature))
                recs = [layer.router.last_routing for layer in self.transform.layers]
                ids.append(routing_in_batch_layout([r.ids for r in recs], b, s))
                gates.append(routing_in_batch_layout([r.gates for r in recs], b, s))
        # the rollout batch lives on the CPU; these are small
        return self.after_update(p, torch.cat(logps).cpu(), torch.cat(ids, 1).cpu(),
                                 torch.cat(gates, 1).cpu(), anchor=anchor)

    @torch.no_grad()
    def after_update(self, p: PendingBatch, logp: torch.Tensor, ids: torch.Tensor,
                     gates: torch.Tensor, *, anchor: bool) -> dict:
        """``behavior/*_after`` and D from the learner's log-probs [N, S] and routing ids and
        gates [Lm, N, S, k] at the weights after the update (on the CPU)."""
        batch = p.batch
        out = {f"{k}_after": v for k, v in self.behaviour(logp, batch).items()}
        if anchor and batch.routing_ids.numel():
            # [Lm, N, S]: response tokens (§10) where the actors logged their routing
            mask = (batch.routing_ids[..., 0] >= 0) & batch.response_mask.unsqueeze(0)
            per_token = trust_region.anchor_distance_per_token(  # [Lm, N, S]
                ids, gates, self.transform.prototypes.unsqueeze(1).cpu(),
                batch.routing_ids.clamp_min(0), batch.routing_gates,
                self.transform.anchor.unsqueeze(1).cpu(),
            )
            parts = trust_region.anchor_distance_partials(per_token, mask)
            D = trust_region.anchor_distance_from_partials(  # the same D on every rank
                gather_over_data_ranks(parts, self.s.groups))
            out["trust/anchor_distance"] = D.float()
        return out

    def behaviour(self, logp: torch.Tensor, batch: RolloutBatch) -> dict:
        """Drift and ESS of the learner against the actors on the whole batch (§11): every
        data-parallel rank's share combined, so all ranks see (and decide on) the same values."""
        b = self.cfg.vp2o.behavior
        parts = trust_region.behavior_partials(
            logp, batch.behavior_logprobs, batch.response_mask, lam=b.lam, ess_level=b.ess_level
        )
        drift, ess = trust_region.behavior_from_partials(
            gather_over_data_ranks(parts, self.s.groups))
        return {"behavior/drift": drift.float(), "behavior/ess": ess.float()}


def loss_normaliser(p: PendingBatch, cfg, groups) -> torch.Tensor:
    """What each micro-batch's aggregated loss divides by (``loss.aggregation``): the whole
    global batch's token count, non-empty sequence count or ``B * L_max`` (L_max the
    generation limit), summed over the data-parallel ranks and divided by their number.
    megatron averages gradients over those ranks, so the step follows the gradient of the
    global batch's loss under any layout (a rank-local normaliser would weight the tokens
    of a rank with short responses more)."""
    local = grpo.batch_normaliser(p.batch.response_mask, aggregation=cfg.loss.aggregation,
                                  max_len=cfg.rollout.max_new_tokens)
    shares = gather_over_data_ranks(local, groups)  # [R]
    return shares.sum().clamp_min(1) / shares.shape[0]


def reference_model(s: Session):
    """The frozen KL reference (``loss.kl_coeff > 0``): the run's starting weights."""
    cfg = s.cfg
    ref = build_model(cfg, layer_spec_hook=vp2o_layer_spec_hook(cfg)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    if cfg.train.init_checkpoint:
        load_initial_weights(Session(cfg, s.groups, s.run_dir, s.tokenizer, s.task, ref),
                             cfg.train.init_checkpoint)
    else:  # a resumed run without init_checkpoint: the trainer warns
        ref.load_state_dict(s.model.state_dict())
    return ref


_SPECIALISATION_LOSSES = (("expert_orthogonality_loss", "loss/orthogonality"),
                          ("routing_variance_loss", "loss/routing_variance"))
"""(megatron aux-loss tracker entry, metric key) of the §9 losses."""


def drop_specialisation_losses() -> None:
    """Remove the §9 losses' entries from megatron's aux-loss tracker. Its clear only zeroes an
    entry, and a saved loss adds to it: without this, training forwards outside a step (a
    previous run in the same process, a test) would reach the next step's value, and a run
    without the losses would still report them."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    for name, _ in _SPECIALISATION_LOSSES:
        tracker.pop(name, None)


def specialisation_losses(num_microbatches: int) -> dict:
    """The step's orthogonality and routing-variance losses (§9), mean over MoE layers and
    micro-batches, from megatron's aux-loss tracker (whose entries this then removes)."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    out = {}
    tracker = get_moe_layer_wise_logging_tracker()
    for name, key in _SPECIALISATION_LOSSES:
        values = tracker.pop(name, {}).get("values")  # [layers], 0 where a layer has none
        if values is not None:  # the loss is configured; no host sync here
            layers = (values != 0).sum().clamp_min(1)
            out[key] = values.sum() / layers / max(num_microbatches, 1)
    clear_aux_losses_tracker()
    return out
