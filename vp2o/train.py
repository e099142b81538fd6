"""The RL loop: GRPO and VP2O on megatron-core (method §12), one visible ``for step`` loop.

    vp2o train --config examples/vp2o/configs/demo_vp2o.yaml [key=value ...]

Per learner step:

    rollout (only when a refresh is due) -> reward -> group advantages
    -> forward/backward over micro-batches (policy loss [+ specialisation losses, VP2O])
    -> [VP2O: Stein transform of expert grads] -> DP reduction -> optimizer step
    -> prototype refresh -> [VP2O: post-update check: anchor budget D (accept / roll back),
       behaviour budget drift + ESS] -> log -> checkpoint / evaluate

Actors and learner are colocated: "the actor" is the learner's weights at the last refresh, so
generation simply uses the current weights when a refresh is due (the behaviour log-probs are
recorded then). GRPO refreshes every ``grpo.updates_per_rollout`` steps; VP2O refreshes when a
budget says so or after ``vp2o.max_updates_per_rollout`` steps.

Host-device syncs are marked ``# sync``.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vp2o.algo import grpo, trust_region
from vp2o.config import Config, to_dict
from vp2o.diagnostics import routing_diagnostics
from vp2o.mcore import router_replay, training
from vp2o.mcore.checkpoint import (
    CheckpointError,
    checkpoint_kind,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from vp2o.mcore.model import build_model, check_generation_backend
from vp2o.mcore.parallel import gather_over_data_ranks
from vp2o.mcore.stein_step import SteinTransform
from vp2o.mcore.vp2o_moe import vp2o_layer_spec_hook
from vp2o.metrics import MetricsLogger
from vp2o.rewards.pool import RewardPool
from vp2o.rollout import (
    RolloutBatch,
    SamplingParams,
    generate,
    replay_indices,
    sequence_logprobs,
)
from vp2o.session import Session, claim_run_dir, load_initial_weights, session


@dataclass
class PendingBatch:
    """The rollout batch the learner is working on (per data-parallel rank).

    Attributes:
        batch: what the actors generated.
        advantages: [N] group advantages (method §1).
        rewards: [N] rewards.
        updates: learner steps taken on it so far.
    """

    batch: RolloutBatch
    advantages: torch.Tensor
    rewards: torch.Tensor
    updates: int = 0
    stats: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Plain tensors/numbers/strings, for a checkpoint's ``extra``."""
        batch = {f.name: getattr(self.batch, f.name) for f in dataclasses.fields(self.batch)}
        stats = {k: v if torch.is_tensor(v) else float(v) for k, v in self.stats.items()}
        return {"batch": batch, "advantages": self.advantages, "rewards": self.rewards,
                "updates": self.updates, "stats": stats}

    @classmethod
    def from_state(cls, state: dict | None) -> PendingBatch | None:
        """Inverse of ``state_dict`` (None stays None: no batch was pending)."""
        if state is None:
            return None
        return cls(batch=RolloutBatch(**state["batch"]), advantages=state["advantages"],
                   rewards=state["rewards"], updates=state["updates"], stats=state["stats"])


class PromptRows(list):
    """The prompts of one rollout batch, with their global stream indices (``indices``)."""

    def __init__(self, rows: list[dict], indices: list[int]) -> None:
        super().__init__(rows)
        self.indices = indices


class PromptStream:
    """Training prompts in a per-epoch shuffled order; ``position`` is saved in checkpoints.

    Rank r of W data-parallel ranks takes global indices ``position * W + r``, so the union of
    one step's prompts over the ranks is the same global prompt list whatever W is.
    """

    def __init__(self, rows: list[dict], *, seed: int, rank: int, world: int) -> None:
        self.rows, self.seed, self.rank, self.world = rows, seed, rank, world
        self.position = 0  # prompts consumed by each rank

    def take(self, n: int) -> PromptRows:
        """The next ``n`` prompts of this rank (ranks read disjoint slices)."""
        out, indices = [], []
        for _ in range(n):
            global_index = self.position * self.world + self.rank
            epoch, offset = divmod(global_index, len(self.rows))
            order = list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.rows[order[offset]])
            indices.append(global_index)
            self.position += 1
        return PromptRows(out, indices)


def sampling_params(cfg: Config, *, record_routing: bool) -> SamplingParams:
    """The actors' sampling settings."""
    r = cfg.rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop_strings=list(r.stop_strings),
        group_size=r.group_size,
        record_routing=record_routing,
    )


def make_rollouts(s: Session, rows: list[dict], pool: RewardPool, step: int) -> PendingBatch:
    """Generate G samples per prompt, score them, compute group advantages (method §1).

    Each prompt samples from its own generator seeded by (seed, step, global prompt index), so a
    prompt's responses are the same under any data-parallel layout; plain lists (no
    ``indices``) use their positions offset by the data-parallel rank.
    """
    cfg = s.cfg
    prompts = [s.tokenizer.encode(r["prompt"]) for r in rows]
    indices = getattr(rows, "indices", None)
    if indices is None:
        indices = [s.groups.dp_rank * len(rows) + i for i in range(len(rows))]
    gen = [torch.Generator().manual_seed((cfg.seed * 7919 + step) * 1_000_003 + i)
           for i in indices]
    # The actors' routing is read by VP2O's anchor budget (§10) and by router replay only.
    params = sampling_params(
        cfg, record_routing=cfg.algorithm == "vp2o" or cfg.grpo.router_replay
    )
    t0 = time.perf_counter()
    s.model.eval()
    with torch.no_grad():
        batch = generate(s.model, prompts, params, tokenizer=s.tokenizer, generator=gen,
                         sync_group=dist.group.WORLD)
    s.model.train()
    t_gen = time.perf_counter() - t0
    G = cfg.rollout.group_size
    expanded = [r for r in rows for _ in range(G)]
    scores = pool.score([r["prompt"] for r in expanded], batch.completions, expanded)
    rewards = torch.tensor(scores.rewards, dtype=torch.float32)  # [N]
    advantages = grpo.group_advantages(rewards, G, normalize_std=cfg.grpo.normalize_std)
    if cfg.grpo.overlong_filter and batch.truncated.numel():
        batch.response_mask &= ~batch.truncated.unsqueeze(1)
    # The logged batch statistics are the whole global batch's: every data-parallel rank's sums
    # [Σr, Σr², correct, Σ length, sequences, reward failures], added up.
    r = rewards.double()
    total = gather_over_data_ranks(torch.stack([
        r.sum(), r.square().sum(), (r >= 1.0).sum().double(),
        batch.response_lengths.double().sum(), torch.tensor(float(r.numel()), dtype=torch.float64),
        torch.tensor(float(scores.failures), dtype=torch.float64),
    ]), s.groups).sum(0)  # [6]
    n = total[4].clamp_min(1)
    mean = total[0] / n
    var = (total[1] - n * mean.square()) / (n - 1).clamp_min(1)  # sample variance (n - 1)
    stats = {
        "reward/mean": mean.float(),
        "reward/std": var.clamp_min(0).sqrt().float(),
        "accuracy": (total[2] / n).float(),
        "response/length_mean": (total[3] / n).float(),
        "reward/failures": float(total[5]),
        "perf/generate_s": t_gen,
        "perf/reward_s": scores.seconds,
        "perf/generated_tokens": float(batch.response_lengths.sum()),
    }
    pending = PendingBatch(batch=batch, advantages=advantages, rewards=rewards, stats=stats)
    if cfg.grpo.dynamic_sampling:
        pending = drop_flat_groups(pending, G)
    return pending


def drop_flat_groups(p: PendingBatch, group_size: int) -> PendingBatch:
    """DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage)."""
    r = p.rewards.view(-1, group_size)  # [prompts, G]
    keep_groups = (r.max(1).values - r.min(1).values) > 0
    keep = keep_groups.repeat_interleave(group_size).nonzero().squeeze(1)
    if keep.numel() == 0:
        return p  # nothing to learn from: the step is a no-op, the next one refreshes
    p.stats["dynamic_sampling/kept_frac"] = keep_groups.float().mean()
    return PendingBatch(
        batch=p.batch.select(keep), advantages=p.advantages[keep], rewards=p.rewards[keep],
        updates=p.updates, stats=p.stats,
    )


def micro_batches(p: PendingBatch, size: int, device: torch.device,
                  denominator: torch.Tensor | float = 1.0) -> list[dict]:
    """Split the pending batch into learner micro-batches of ``size`` sequences on ``device``.

    ``denominator`` is the loss normaliser every micro-batch divides by
    (``Learner.loss_normaliser``); the forward-only callers leave it at 1.
    """
    n = p.batch.num_sequences
    denominator = torch.as_tensor(denominator, dtype=torch.float32).to(device)
    out = []
    for start in range(0, n, size):
        idx = torch.arange(start, min(start + size, n))
        out.append({"batch": p.batch.select(idx).to(device), "adv": p.advantages[idx].to(device),
                    "denominator": denominator})
    return out


def routing_in_batch_layout(records: list, b: int, s: int) -> torch.Tensor:
    """Per-layer [S*b, k] router rows (megatron order s*b + n) -> [layers, b, S, k]."""
    return torch.stack([r.view(s, b, -1).transpose(0, 1) for r in records])


class Learner:
    """Loss, step, trust region and rollback for one rank. Holds no hidden global state."""

    def __init__(self, s: Session, transform: SteinTransform, ref_model=None) -> None:
        self.s, self.transform, self.ref_model = s, transform, ref_model
        self.cfg = s.cfg
        self.vp2o = s.cfg.algorithm == "vp2o"
        self._uncovered: list | None = None  # parameters a snapshot copies (see snapshot)

    # --------------------------------------------------------------- loss (method §1, §2)
    def loss_fn(self, model, mb: dict):
        """Policy loss of one micro-batch; returns (loss, detached stats)."""
        cfg, batch = self.cfg, mb["batch"]
        if cfg.grpo.router_replay:
            router_replay.replay(self.s.model, replay_indices(batch.routing_ids))
        temperature = batch.logprob_temperature
        logp = sequence_logprobs(model, batch, temperature=temperature)  # [b, S]
        logp_ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                logp_ref = sequence_logprobs(self.ref_model, batch, temperature=temperature)
        if self.vp2o:
            clip = (cfg.grpo.clip_low, cfg.grpo.clip_high) if cfg.vp2o.clip else (None, None)
            estimator = cfg.vp2o.pg_estimator
        else:
            clip = (cfg.grpo.clip_low, cfg.grpo.clip_high)
            estimator = "gspo" if cfg.grpo.loss_type == "gspo" else "ratio"
        loss, stats = grpo.policy_loss(
            logp, batch.behavior_logprobs, mb["adv"], batch.response_mask,
            clip_low=clip[0], clip_high=clip[1], aggregation=cfg.grpo.aggregation,
            pg_estimator=estimator, clip_ratio_c=cfg.grpo.clip_ratio_c, logp_ref=logp_ref,
            kl_coeff=cfg.grpo.kl_coeff, kl_estimator=cfg.grpo.kl_estimator,
            denominator=mb["denominator"],
        )
        stats = {k: v.detach() for k, v in stats.items()}
        stats["loss/policy"] = loss.detach()
        stats["_logp"] = logp.detach()
        mask = batch.response_mask
        stats["_entropy_sum"] = -(logp.detach() * mask).sum()
        stats["_tokens"] = mask.sum()
        return loss, stats

    def loss_normaliser(self, p: PendingBatch) -> torch.Tensor:
        """What each micro-batch's aggregated loss divides by (``grpo.batch_normaliser``): the
        whole global batch's token count, non-empty sequence count or ``B * L_max`` (L_max the
        generation limit), summed over the data-parallel ranks and divided by their number.
        megatron averages gradients over those ranks, so the step follows the gradient of the
        global batch's loss under any layout (a rank-local normaliser would weight the tokens
        of a rank with short responses more)."""
        cfg = self.cfg
        local = grpo.batch_normaliser(p.batch.response_mask, aggregation=cfg.grpo.aggregation,
                                      max_len=cfg.rollout.max_new_tokens)
        shares = gather_over_data_ranks(local, self.s.groups)  # [R]
        return shares.sum().clamp_min(1) / shares.shape[0]

    # --------------------------------------------------------------- rollback state (§10)
    def snapshot(self) -> dict:
        """Copies of the optimizers' main params and state, and of the parameters they do not
        determine (§10 rollback).

        Keyed by the live tensors themselves, so state that the step creates (Adam's moments
        appear at the first step) is told apart and dropped on restore. Not copied: parameters
        whose memory is exactly an optimizer parameter's (megatron's FP32Optimizer steps the
        parameters themselves; the distributed optimizer at data-parallel size 1 steps views of
        the whole buffer), and parameters that megatron writes from the main params after each
        step (bf16 params of the mixed-precision optimizers: their rounded main params; with the
        distributed optimizer every parameter in its buffers: the owners' shards, all-gathered).
        ``restore`` rebuilds those the same way, so a rollback costs the fp32 main params and
        the optimizer state of the rank's shard, not a second copy of the model.
        """
        optimizers = []
        for part in _megatron_parts(self.s.optimizer):
            opt = part.optimizer
            main = {p: p.data.clone() for g in opt.param_groups for p in g["params"]}
            state = {p: {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                         for k, v in st.items()} for p, st in opt.state.items()}
            optimizers.append((part, main, state))
        params = {p: p.data.clone() for p in self._params_to_copy()}
        return {"params": params, "optimizers": optimizers}

    def _params_to_copy(self) -> list:
        """The parameters neither stepped in place nor rebuilt from main params (``snapshot``).
        Found once, at the first snapshot (after any checkpoint load): parameters, main params
        and megatron's buffers keep their memory for the rest of the run, so the per-step
        snapshot does not walk every parameter's storage again."""
        if self._uncovered is None:
            covered = set()
            for part in _megatron_parts(self.s.optimizer):
                covered.update(_memory(p) for g in part.optimizer.param_groups
                               for p in g["params"])
                covered.update(_memory(p) for p in _params_written_from_main(part))
            self._uncovered = [p for p in self.s.model.parameters()
                               if _memory(p) not in covered]
        return self._uncovered

    def restore(self, saved: dict) -> None:
        """Undo a step: main params and optimizer state as in ``saved``, then the parameters
        from them as megatron's own step writes them (rounded copy; the distributed optimizer's
        all-gather: a collective, which every rank reaches since the decision is global)."""
        for p, value in saved["params"].items():
            p.data.copy_(value)
        chunks = {}
        for part, main, state in saved["optimizers"]:
            opt = part.optimizer
            for p, value in main.items():
                p.data.copy_(value)
            for p in list(opt.state.keys()):
                if p not in state:
                    del opt.state[p]  # created by the rejected step
            for p, st in state.items():
                opt.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            if _writes_model_params(part):
                part._copy_main_params_to_model_params()
            if _is_distributed(part):  # a stub part (no shard here) still joins the all-gather
                chunks.update((id(chunk), chunk) for chunk in part.model_chunks)
        for chunk in chunks.values():
            chunk.start_param_sync(force_sync=True)  # overlap_param_gather is off (config)

    # --------------------------------------------------------------- post-update check
    @torch.no_grad()
    def evaluate_update(self, p: PendingBatch) -> dict:
        """Log-probs and learner routing after the step: drift/ESS (§11) and D (§10)."""
        cfg, model = self.cfg, self.s.model
        model.eval()
        logps, ids, gates = [], [], []
        for mb in micro_batches(p, cfg.rollout.micro_batch_size, self.s.device):
            b, s = mb["batch"].tokens.shape
            logps.append(sequence_logprobs(model, mb["batch"],
                                           temperature=mb["batch"].logprob_temperature))
            recs = [layer.router.last_routing for layer in self.transform.layers]
            ids.append(routing_in_batch_layout([r.ids for r in recs], b, s))
            gates.append(routing_in_batch_layout([r.gates for r in recs], b, s))
        model.train()
        logp = torch.cat(logps).cpu()  # the rollout batch lives on the CPU; these are small
        batch = p.batch
        out = self.behaviour(logp, batch)
        if batch.routing_ids.numel():
            # [Lm, N, S]: response tokens (§10) where the actors logged their routing
            mask = (batch.routing_ids[..., 0] >= 0) & batch.response_mask.unsqueeze(0)
            per_token = trust_region.anchor_distance_per_token(  # [Lm, N, S]
                torch.cat(ids, 1).cpu(), torch.cat(gates, 1).cpu(),
                self.transform.prototypes.unsqueeze(1).cpu(),
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


_MEAN_OVER_RANKS = ("clip/low_frac", "clip/high_frac", "ratio/mean", "kl/k3", "kl")


def learner_metrics(outs: list[dict], groups) -> dict:
    """The step's loss statistics over the whole global batch (one gather over the
    data-parallel ranks, one transfer to the host). ``loss/policy``: each rank's loss is its
    share of the global loss (the normaliser is the global batch's,
    ``Learner.loss_normaliser``), so the global loss is their mean; ``policy/entropy``: total
    entropy over total response tokens; the clip, ratio and KL fractions: the mean of the ranks'
    micro-batch means."""
    keys = [k for k in _MEAN_OVER_RANKS if k in outs[0]]  # the config's: the same on every rank
    row = torch.stack([
        sum(o["loss/policy"] for o in outs), sum(o["_entropy_sum"] for o in outs),
        sum(o["_tokens"] for o in outs),
        *(torch.stack([o[k] for o in outs]).mean() for k in keys),
    ]).double()  # [3 + len(keys)]
    ranks = gather_over_data_ranks(row, groups)  # [R, 3 + len(keys)]
    out = {"loss/policy": ranks[:, 0].mean(),
           "policy/entropy": ranks[:, 1].sum() / ranks[:, 2].sum().clamp_min(1)}
    out.update({k: ranks[:, 3 + i].mean() for i, k in enumerate(keys)})
    return {k: v.float() for k, v in out.items()}


def specialisation_losses(num_microbatches: int) -> dict:
    """The step's orthogonality and routing-variance losses (§9), mean over MoE layers and
    micro-batches, from megatron's aux-loss tracker (which this then clears)."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    out = {}
    tracker = get_moe_layer_wise_logging_tracker()
    for name, key in (("expert_orthogonality_loss", "loss/orthogonality"),
                      ("routing_variance_loss", "loss/routing_variance")):
        values = tracker.get(name, {}).get("values")  # [layers], 0 where a layer has none
        if values is not None:  # the loss is configured; no host sync here
            layers = (values != 0).sum().clamp_min(1)
            out[key] = values.sum() / layers / max(num_microbatches, 1)
    clear_aux_losses_tracker()
    return out


def _memory(t: torch.Tensor) -> tuple:
    """Where a tensor's elements live: (storage address, offset, count, dtype, contiguous)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype,
            t.is_contiguous())


def _megatron_parts(optimizer) -> list:
    """The megatron optimizers inside a (Chained) optimizer (dense and expert parts)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _inner_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's (Chained) optimizer."""
    return [part.optimizer for part in _megatron_parts(optimizer)]


def step_state(model, optimizer) -> list[torch.Tensor]:
    """Every tensor an optimizer step writes, live and in a fixed order: the model's parameters,
    then per megatron optimizer part its main params, each followed by its state tensors. What a
    rollback must put back (the rollback checks compare these bit for bit)."""
    out = [p.detach() for p in model.parameters()]
    for inner in _inner_optimizers(optimizer):
        for p in (q for group in inner.param_groups for q in group["params"]):
            out.append(p.detach())
            out += [v for v in inner.state.get(p, {}).values() if torch.is_tensor(v)]
    return out


def _is_distributed(part) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(part, DistributedOptimizer)


def _writes_model_params(part) -> bool:
    """Whether megatron's step writes ``part``'s model params from its main params (the
    mixed-precision optimizers: Float16OptimizerWithFloat16Params, DistributedOptimizer)."""
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    return isinstance(part, MixedPrecisionOptimizer) and not getattr(
        part, "is_stub_optimizer", False)


def _params_written_from_main(part) -> list:
    """Model params that ``part``'s step rewrites whole from main params (see ``snapshot``)."""
    if _is_distributed(part):
        # Every param of the DDP buffers: the local shard from this rank's main params, the rest
        # by the all-gather from the other ranks' (megatron's step, and ``restore``).
        return [p for chunk in part.model_chunks
                for buffer in chunk.buffers + chunk.expert_parallel_buffers
                for p in buffer.params]
    if _writes_model_params(part):  # Float16OptimizerWithFloat16Params: rounded main params
        return [p for group in part.float16_groups for p in group]
    return []


def _grads_finite(ddp) -> torch.Tensor:
    """1.0 when every gradient in the DDP buffers is finite on every rank, else 0.0."""
    flags = [torch.isfinite(b.grad_data).all() for b in ddp.buffers + ddp.expert_parallel_buffers]
    ok = torch.stack(flags).all().float().reshape(1)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok[0]


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's ``--signal=USR1@120`` before a requeue or the time limit) ask
    the loop to checkpoint and exit cleanly at the end of the current step.

    The flag is all-reduced every step (one scalar), so every rank stops at the same step even
    when the signal reached only some of them.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def anywhere(self) -> bool:
        """True when any rank received a stop signal (a collective)."""
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")  # nccl reduces CUDA tensors only
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0])  # sync

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config) -> dict:
    """Run RL training; returns the last step's metrics (python floats)."""
    cfg.check_loop_settings(generates=True, rl=True)
    check_generation_backend(cfg.model)
    claim_run_dir(cfg, "train")
    with session(cfg, with_optimizer=True, total_steps=cfg.train.steps) as s:
        return _train(s)


def _train(s: Session) -> dict:
    cfg = s.cfg
    vp2o = cfg.algorithm == "vp2o"
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_size = world // cfg.parallel.model_parallel_size
    transform = SteinTransform(
        s.model, cfg.vp2o, s.groups, num_experts=cfg.model.num_experts, seed=cfg.seed,
        transport=vp2o,
    )
    ref_model = None
    if cfg.grpo.kl_coeff > 0:  # frozen starting weights (optional, off by default)
        ref_model = build_model(cfg, layer_spec_hook=vp2o_layer_spec_hook(cfg)).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
        if cfg.train.init_checkpoint:
            load_initial_weights(Session(cfg, s.groups, s.run_dir, s.tokenizer, s.task,
                                         ref_model), cfg.train.init_checkpoint)
        else:
            ref_model.load_state_dict(s.model.state_dict())
    stream = PromptStream(s.task.train, seed=cfg.seed, rank=s.groups.dp_rank, world=dp_size)
    learner = Learner(s, transform, ref_model)
    ckpt_root = s.run_dir / "checkpoints"

    start_step, pending, skips = 0, None, 0
    rejected = 0  # consecutive trust-region rejections (a warning at 10, 100, 1000)
    resume_path = _resume_path(cfg, ckpt_root)
    if resume_path is not None:
        extra = load_checkpoint(resume_path, model=s.model, optimizer=s.optimizer,
                                scheduler=s.scheduler)
        start_step, stream.position = extra["step"], extra["data_position"]
        transform.load_state_dict(extra["transform"])
        saved = extra["pending"]  # one rollout batch per rank of the saving run
        if len(saved) == dist.get_world_size():
            pending = PendingBatch.from_state(saved[rank])
        else:  # the same decision on every rank: an IndexError on some would hang the others
            pending = None
            if rank == 0:
                print(f"vp2o: warning: resumed on {dist.get_world_size()} ranks from a checkpoint "
                      f"of {len(saved)}: its unfinished rollout batches are dropped and the next "
                      "step samples fresh ones (and the prompt order differs from the run's)",
                      flush=True)
        skips = extra.get("consecutive_skips", 0)
        if ref_model is not None and not cfg.train.init_checkpoint:
            print("vp2o: warning: resumed without train.init_checkpoint: the KL reference is the "
                  "resumed weights, not the run's starting weights", flush=True)
            ref_model.load_state_dict(s.model.state_dict())
    elif cfg.train.init_checkpoint:
        load_initial_weights(s, cfg.train.init_checkpoint)
        transform = SteinTransform(
            s.model, cfg.vp2o, s.groups, num_experts=cfg.model.num_experts, seed=cfg.seed,
            transport=vp2o,
        )  # prototypes of the loaded weights
        learner.transform = transform

    logger = MetricsLogger(
        s.run_dir, config=to_dict(cfg), run_name=s.run_dir.name, wandb_mode=cfg.train.wandb_mode,
        wandb_project=cfg.train.wandb_project, is_main=s.is_main,
    )
    logger.truncate_after(start_step)
    pool = RewardPool(cfg.reward.name, workers=cfg.reward.workers, timeout_s=cfg.reward.timeout_s)
    max_updates = cfg.vp2o.max_updates_per_rollout if vp2o else cfg.grpo.updates_per_rollout
    metrics: dict = {}
    stop = StopRequest()
    try:
        for step in range(start_step, cfg.train.steps):
            t_step = time.perf_counter()
            m: dict = {}
            # ---- rollout (a refresh: new batch from the current weights, new anchor) ----
            if pending is None:
                pending = make_rollouts(s, stream.take(cfg.rollout.prompts_per_step), pool, step)
                transform.snapshot_anchor()
                m["events/refresh"] = 1.0
                m.update(pending.stats)
            else:
                m["events/refresh"] = 0.0
            # ---- learner step ----
            saved = None
            if vp2o and cfg.vp2o.trust_region.on_violation == "rollback":
                saved = (learner.snapshot(), transform.state_dict())
            training.zero_grads(s.ddp, s.optimizer)
            transform_stats: dict = {}
            t_transform = [0.0]

            def before_reduction(ddp, _out=transform_stats, _t=t_transform):
                t0 = time.perf_counter()
                _out.update(transform.before_grad_reduction(ddp))
                _t[0] = time.perf_counter() - t0

            t0 = time.perf_counter()
            outs = training.forward_backward(
                s.ddp, micro_batches(pending, cfg.rollout.micro_batch_size, s.device,
                                     learner.loss_normaliser(pending)),
                learner.loss_fn,
                before_grad_reduction=before_reduction,
            )
            if cfg.grpo.router_replay:
                router_replay.stop(s.model)
            m.update(specialisation_losses(len(outs)))
            finite = bool(_grads_finite(s.ddp)) and all(  # sync
                bool(torch.isfinite(o["loss/policy"])) for o in outs
            )
            if finite:
                s.optimizer.step()
                skips = 0
            else:
                skips += 1
                m["events/skipped_step"] = 1.0
            t_train = time.perf_counter() - t0
            transform.after_optimizer_step()  # prototype refresh (§4); resets routing stats
            pending.updates += 1
            logp = torch.cat([o["_logp"] for o in outs]).cpu()
            # ---- budgets: VP2O checks the step it just took; GRPO logs drift/ESS ----
            refresh = pending.updates >= max_updates
            if vp2o and finite:
                check = learner.evaluate_update(pending)
                m.update(check)
                accepted = bool(check.get("trust/anchor_distance", 0.0)
                                <= cfg.vp2o.trust_region.delta)  # sync
                m["trust/accepted"] = float(accepted)
                rejected = 0 if accepted else rejected + 1
                if not accepted:
                    refresh = True
                    if saved is not None:
                        learner.restore(saved[0])
                        transform.load_state_dict(saved[1])
                if rejected in (10, 100, 1000) and saved is not None and s.is_main:
                    # A rollback restores the optimizer state too, so the retry on the next
                    # batch takes about the same step again: without a change it never passes.
                    print(f"vp2o: warning: the anchor trust region rejected {rejected} "
                          f"consecutive steps (D = {float(check['trust/anchor_distance']):.3g} > "
                          f"vp2o.trust_region.delta = {cfg.vp2o.trust_region.delta}); each "
                          "retry repeats about the same update: lower optimizer.lr or raise "
                          "vp2o.trust_region.delta", flush=True)
                b = cfg.vp2o.behavior
                drift, ess = float(check["behavior/drift"]), float(check["behavior/ess"])  # sync
                if drift > b.eps_drift or ess < b.ess_min:
                    refresh = True
            else:
                m.update(learner.behaviour(logp, pending.batch))
            if finite and (not vp2o or m.get("trust/accepted", 1.0)):
                s.scheduler.step(1)
            if skips >= cfg.train.max_consecutive_skips:
                logger.log(step, {k: v for k, v in m.items() if v is not None})
                _save(s, ckpt_root, step, stream, transform, pending, skips)
                raise RuntimeError(
                    f"{skips} consecutive steps had non-finite loss or gradients; stopped at "
                    f"step {step} with a checkpoint of the last good state in {ckpt_root}"
                )
            # ---- metrics ----
            m.update(learner_metrics(outs, s.groups))
            m["router/entropy"] = transform_stats.get("router/entropy")
            if "C" in transform_stats:
                m.update(routing_diagnostics(transform_stats["C"], transform.prototypes,
                                             cfg.model.moe_router_topk))
            for key in ("stein/attraction_norm", "stein/repulsion_norm"):
                if key in transform_stats:
                    m[key] = transform_stats[key]
            m["lr"] = s.optimizer.param_groups[0]["lr"]
            m["perf/train_s"] = t_train
            m["perf/transform_s"] = t_transform[0]
            m["perf/step_s"] = time.perf_counter() - t_step
            m["perf/tokens_per_s"] = float(pending.batch.valid.sum()) / m["perf/step_s"]
            if refresh:
                pending = None
            # ---- checkpoint, evaluation ----
            last = step + 1 == cfg.train.steps
            if last or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
                _save(s, ckpt_root, step + 1, stream, transform, pending, skips)
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and not last:
                from vp2o.evaluate import evaluate

                m.update({f"eval/{k}": v for k, v in evaluate(s, pool).items()
                          if isinstance(v, float)})
            metrics = {k: v for k, v in m.items() if v is not None}
            logger.log(step, metrics)
            if not last and stop.anywhere():
                _save(s, ckpt_root, step + 1, stream, transform, pending, skips)
                print(f"vp2o: stop signal: checkpoint of step {step + 1} written to "
                      f"{ckpt_root}; exiting (resume continues from it)", flush=True)
                return {**{k: _scalar(v) for k, v in metrics.items()},
                        "stopped_at_step": step + 1}
        from vp2o.evaluate import evaluate, write_eval

        result = evaluate(s, pool)
        if s.is_main:
            write_eval(s.run_dir, result)
        return {**{k: _scalar(v) for k, v in metrics.items()}, **result}
    finally:
        stop.restore()
        pool.close()
        logger.close()


def _scalar(v):
    if torch.is_tensor(v):
        return v.tolist() if v.dim() else float(v)
    return v


def _resume_path(cfg: Config, root: Path) -> Path | None:
    if cfg.train.resume == "never":
        return None
    path = latest_checkpoint(root) if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if path is not None and not path.is_dir():
        raise CheckpointError(
            f"train.resume = {cfg.train.resume!r}: expected auto, never, or a checkpoint "
            "directory (step_*) that exists"
        )
    if path is not None and (kind := checkpoint_kind(path)) != "train":
        raise CheckpointError(
            f"train.resume = {cfg.train.resume!r}: checkpoint {path} was written by "
            f"{f'vp2o {kind}' if kind else 'another loop'}, not vp2o train (it has no trainer "
            f"state to resume); to start from its weights: train.init_checkpoint={path}"
        )
    return path


def _save(s: Session, root, step, stream, transform, pending, skips) -> None:
    gathered = [None] * dist.get_world_size()
    state = None if pending is None else pending.state_dict()
    dist.all_gather_object(gathered, state)  # each rank's batch, so any rank can resume
    extra = {
        "kind": "train",
        "step": step,
        "data_position": stream.position,
        "transform": transform.state_dict(),
        "pending": gathered,
        "consecutive_skips": skips,
        "config": to_dict(s.cfg),
    }
    save_checkpoint(root, step, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler,
                    extra=extra, keep_last=s.cfg.train.keep_last)

