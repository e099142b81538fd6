"""One rollout batch of the RL loop: generate, score, group advantages (method §1, §12).

    pending = make_rollouts(session, stream.take(n), pool, step)   # [N = n * G sequences]
    for mb in micro_batches(pending, size, device, normaliser): ...

``PendingBatch`` is what the learner works on until the next refresh; it is saved in trainer
checkpoints (``state_dict``) so that a resumed run continues on the same batch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vp2o.algo import grpo
from vp2o.config import Config
from vp2o.engines import awake_engine, needs_routes
from vp2o.mcore import packing
from vp2o.mcore.parallel import gather_over_data_ranks
from vp2o.rewards.pool import RewardPool
from vp2o.rollout import RolloutBatch, SamplingParams
from vp2o.session import Session


@dataclass
class PendingBatch:
    """The rollout batch the learner is working on (per data-parallel rank).

    Attributes:
        batch: what the actors generated.
        advantages: [N] group advantages (method §1).
        rewards: [N] rewards.
        updates: learner steps taken on it so far.
        stats: the batch's logged statistics (global batch: every data-parallel rank's).
        rollout_logprobs: [N, S] the learner's log-probs at the rollout weights (its first
            update's forward, kept by ``Learner.step`` under a mismatch correction): the
            correction's reference on the batch's later updates; None before that.
    """

    batch: RolloutBatch
    advantages: torch.Tensor
    rewards: torch.Tensor
    updates: int = 0
    stats: dict = field(default_factory=dict)
    rollout_logprobs: torch.Tensor | None = None

    def state_dict(self) -> dict:
        """Plain tensors/numbers/strings, for a checkpoint's ``extra``."""
        batch = {f.name: getattr(self.batch, f.name) for f in dataclasses.fields(self.batch)}
        stats = {k: v if torch.is_tensor(v) else float(v) for k, v in self.stats.items()}
        return {"batch": batch, "advantages": self.advantages, "rewards": self.rewards,
                "updates": self.updates, "stats": stats,
                "rollout_logprobs": self.rollout_logprobs}

    @classmethod
    def from_state(cls, state: dict | None) -> PendingBatch | None:
        """Inverse of ``state_dict`` (None stays None: no batch was pending)."""
        if state is None:
            return None
        return cls(batch=RolloutBatch(**state["batch"]), advantages=state["advantages"],
                   rewards=state["rewards"], updates=state["updates"], stats=state["stats"],
                   rollout_logprobs=state.get("rollout_logprobs"))


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
    params = sampling_params(cfg, record_routing=needs_routes(cfg))
    t0 = time.perf_counter()
    with awake_engine(s) as engine:  # a vLLM engine is first synced with the learner's weights
        t_sync = time.perf_counter() - t0
        batch = engine.generate(prompts, params, generator=gen)
    t_gen = time.perf_counter() - t0 - t_sync
    # an engine that returns routed-expert ids only (CUDA vLLM) leaves the gates to the learner's
    # first forward on the batch (Learner.fills_actor_gates)
    G = cfg.rollout.group_size
    expanded = [r for r in rows for _ in range(G)]
    scores = pool.score([r["prompt"] for r in expanded], batch.completions, expanded)
    rewards = torch.tensor(scores.rewards, dtype=torch.float32)  # [N]
    advantages = grpo.group_advantages(rewards, G, normalize_std=cfg.advantage.normalize_std)
    if cfg.loss.overlong_filter and batch.truncated.numel():
        batch.response_mask &= ~batch.truncated.unsqueeze(1)
    # The logged batch statistics are the whole global batch's: every data-parallel rank's sums
    # [Σr, Σr², correct, Σ length, sequences, reward failures, ranks whose reward workers did
    # not start], added up.
    r = rewards.double()
    total = gather_over_data_ranks(torch.stack([
        r.sum(), r.square().sum(), (r >= 1.0).sum().double(),
        batch.response_lengths.double().sum(), torch.tensor(float(r.numel()), dtype=torch.float64),
        torch.tensor(float(scores.failures), dtype=torch.float64),
        torch.tensor(float(pool.last_start_failure is not None), dtype=torch.float64),
    ]), s.groups).sum(0)  # [7]
    n = total[4].clamp_min(1)
    mean = total[0] / n
    var = (total[1] - n * mean.square()) / (n - 1).clamp_min(1)  # sample variance (n - 1)
    stats = {
        "reward/mean": mean.float(),
        "reward/std": var.clamp_min(0).sqrt().float(),
        "accuracy": (total[2] / n).float(),
        "response/length_mean": (total[3] / n).float(),
        "reward/failures": float(total[5]),
        "reward/not_started": float(total[6]),  # the same on every rank: stops them together
        "perf/generate_s": t_gen,
        "perf/sync_s": t_sync,
        "perf/reward_s": scores.seconds,
        "perf/generated_tokens": float(batch.response_lengths.sum()),
        "rollout/generated_tokens": float(total[3]),  # the global batch's (all ranks)
        "rollout/samples": float(total[4]),
        "rollout/prompts": float(total[4]) / cfg.rollout.group_size,
    }
    pending = PendingBatch(batch=batch, advantages=advantages, rewards=rewards, stats=stats)
    if cfg.advantage.dynamic_sampling:
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
                  denominator: torch.Tensor | float = 1.0, *,
                  max_tokens: int | None = None) -> list[dict]:
    """Split the pending batch into learner micro-batches of ``size`` sequences on ``device``,
    or, with ``max_tokens`` (``train.max_tokens_per_microbatch``), into packed micro-batches of
    at most that many real tokens (``vp2o.mcore.packing``; ``"packed": True``, the same number of
    micro-batches on every rank).

    ``denominator`` is the loss normaliser every micro-batch divides by
    (``vp2o.learner.loss_normaliser``); the forward-only callers leave it at 1. ``"index"`` holds
    each micro-batch's sequences in the batch (``in_batch_order`` undoes the grouping).
    """
    n = p.batch.num_sequences
    denominator = torch.as_tensor(denominator, dtype=torch.float32).to(device)
    if max_tokens:
        groups = _token_budget_groups(p.batch, max_tokens)
    else:
        groups = [torch.arange(start, min(start + size, n)) for start in range(0, n, size)]
    out = [{"batch": p.batch.select(idx).to(device), "adv": p.advantages[idx].to(device),
            "denominator": denominator, "index": idx, "packed": bool(max_tokens)}
           for idx in groups]
    if p.rollout_logprobs is not None:
        for mb in out:
            mb["logp_rollout"] = p.rollout_logprobs[mb["index"]].to(device)
    return out


def _token_budget_groups(batch: RolloutBatch, max_tokens: int) -> list[torch.Tensor]:
    """Sequence indices of each packed micro-batch; as many micro-batches on every rank (MAX over
    the world: the expert-parallel all-to-all pairs the forwards of the ranks)."""
    lengths = batch.valid.sum(-1).tolist()
    groups = packing.plan(lengths, max_tokens)
    if dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor([len(groups)], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            count = count.cuda()
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        groups = packing.equalise(groups, lengths, int(count))
    return [torch.tensor(g, dtype=torch.long) for g in groups]


def in_batch_order(parts: list[torch.Tensor], mbs: list[dict], dim: int = 0) -> torch.Tensor:
    """Per-micro-batch rows (e.g. the loss's log-probs ``[b_i, S]``, or routing
    ``[Lm, b_i, S, k]`` with ``dim=1``) back in the batch's order."""
    out = torch.cat(parts, dim)
    index = torch.cat([mb["index"] for mb in mbs]).to(out.device)
    return torch.empty_like(out).index_copy_(dim, index, out)
