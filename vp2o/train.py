"""The RL loop: GRPO and VP2O on megatron-core (method §12), one visible ``for step`` loop.

    vp2o train --config examples/vp2o/configs/demo_vp2o.yaml [key=value ...]

Per step (``train.steps`` of them: the data budget, the same under both algorithms):

    rollout: a new batch from the current weights -> rewards -> group advantages (experience.py)
    -> up to train.updates_per_rollout learner updates on it                     (learner.py):
         forward/backward over micro-batches, [VP2O: Stein transform of the expert gradients
         before their data-parallel reduction], optimizer step, prototype refresh;
         behaviour check [VP2O: anchor budget D (§10: keep or roll back), drift + ESS after the
         update (§11): a violated budget ends the batch early]
    -> scheduler step -> log -> evaluate -> checkpoint

Actors and learner are colocated: "the actor" is the learner's weights at the step's rollout
(the behaviour log-probs are recorded then). GRPO takes every update of the step (a fixed
schedule); VP2O takes at most that many.

Every way out of the loop (the last step, a stop signal, too many non-finite steps) goes
through the one checkpoint at the end of the step. Host-device syncs are marked ``# sync``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vp2o.config import Config, to_dict
from vp2o.data.prompts import PromptStream
from vp2o.engines import check_engine_settings
from vp2o.eval_stats import EvalHistory
from vp2o.evaluate import evaluate, write_eval
from vp2o.experience import PendingBatch, make_rollouts
from vp2o.learner import Learner
from vp2o.mcore.checkpoint import (
    CheckpointError,
    checkpoint_kind,
    latest_checkpoint,
    load_checkpoint,
    recover_replaced,
    save_checkpoint,
)
from vp2o.metrics import MetricsLogger, to_python
from vp2o.rewards.pool import RewardPool
from vp2o.session import Session, claim_run_dir, load_initial_weights, session


def train(cfg: Config) -> dict:
    """Run RL training; returns the last step's metrics and the final evaluation (python
    floats), or the last metrics and ``stopped_at_step`` after a stop signal."""
    cfg.require_loop("train")
    check_engine_settings(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any weights
    claim_run_dir(cfg, "train")
    with session(cfg, with_optimizer=True, total_steps=cfg.train.steps) as s:
        # ---- build: weights (resumed or initial) first, then what is derived from them ----
        ckpt_root = s.run_dir / "checkpoints"
        progress = load_progress(s, ckpt_root)
        learner = Learner(s)  # prototypes (§4) of the loaded weights
        if progress.transform is not None:
            learner.transform.load_state_dict(progress.transform)
        stream = PromptStream(s.task.train, seed=cfg.seed, rank=s.groups.dp_rank,
                              world=cfg.parallel.data_parallel(dist.get_world_size()))
        if progress.prompts is not None:
            stream.load_state_dict(progress.prompts)
        logger = MetricsLogger(
            s.run_dir, config=to_dict(cfg), run_name=s.run_dir.name, is_main=s.is_main,
            wandb_mode=cfg.train.wandb_mode, wandb_project=cfg.train.wandb_project,
            resume_step=progress.step,
        )
        pool = RewardPool(cfg.reward.name, workers=cfg.reward.workers,
                          timeout_s=cfg.reward.timeout_s)
        stop = StopRequest()
        with closing(pool), logger, stop:
            return _loop(s, learner, stream, pool, logger, stop, progress, ckpt_root)


def _loop(s: Session, learner: Learner, stream: PromptStream, pool: RewardPool,
          logger: MetricsLogger, stop: StopRequest, progress: Progress, ckpt_root: Path) -> dict:
    cfg, vp2o = s.cfg, learner.vp2o
    metrics: dict = {}
    reward_down = 0  # consecutive batches in which the reward's workers did not start
    for step in range(progress.step, cfg.train.steps):
        t_step = time.perf_counter()
        # ---- rollout: this step's batch from the current weights, and a new anchor (§10) ----
        if progress.pending is None:  # else the batch of a failed step, retried after a resume
            progress.pending = make_rollouts(s, stream.take(cfg.rollout.prompts_per_step), pool,
                                             step)
        pending = progress.pending
        learner.transform.snapshot_anchor()
        m: dict = {"events/refresh": 1.0, **pending.stats}
        # ---- learner updates on it: GRPO all of them, VP2O until a budget asks for a refresh --
        # (VP2O: an update that another may follow is checked in that one's forward, which
        # then runs before the check decides whether it steps: vp2o.check_in_next_forward)
        updates = []
        grads = learner.gradients(pending)
        for k in range(cfg.updates_per_rollout):
            more = k + 1 < cfg.updates_per_rollout
            update = learner.step(pending, grads)
            grads = None
            if more and update.finite and learner.checks_in_next_forward(k):
                grads = learner.gradients(pending, capture=True)
            check = learner.check(pending, update, more_updates=more, after=grads)
            progress.skips = 0 if update.finite else progress.skips + 1
            refresh = progress.skips >= cfg.train.max_consecutive_skips
            if vp2o and update.finite:
                refresh |= _vp2o_budgets(s, learner, progress, check, more)
                if more:
                    learner.count_continuation(k, not refresh)
            updates.append({**update.metrics, **check})
            if refresh:
                if grads is not None:
                    learner.discard()
                    updates[-1]["events/discarded_backward"] = 1.0
                break
            if more and grads is None:
                grads = learner.gradients(pending)
        m.update(_combine_updates(updates))
        m["train/updates"] = float(len(updates))
        m["events/early_refresh"] = float(len(updates) < cfg.updates_per_rollout)
        failed = progress.skips >= cfg.train.max_consecutive_skips
        reward_down = reward_down + 1 if m.get("reward/not_started") else 0
        no_reward = 0 < cfg.reward.max_start_failures <= reward_down  # the same on every rank
        if not failed:  # a failed step is retried on resume, at the same learning rate
            s.scheduler.step(1)  # once per step (rollout batch): the same schedule in both modes
            progress.pending = None
        # ---- log, evaluate (at eval_every; the final evaluation follows the loop) ----
        last = step + 1 == cfg.train.steps
        m["lr"] = s.optimizer.param_groups[0]["lr"]
        m["perf/step_s"] = time.perf_counter() - t_step
        m["perf/tokens_per_s"] = float(pending.batch.valid.sum()) / m["perf/step_s"]
        progress.count(m)
        m.update({f"progress/{k}": v for k, v in progress.totals.items()})
        stopped = not (last or failed or no_reward) and stop.anywhere()  # every rank asks
        if (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
                and not (last or failed or stopped or no_reward)):
            result = evaluate(s, pool)
            progress.history.add(step + 1, result)
            m.update({f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
        metrics = {k: v for k, v in m.items() if v is not None}
        logger.log(step, metrics)
        # ---- checkpoint: also the one way out of the loop ----
        progress.step = step if failed else step + 1
        if last or failed or stopped or no_reward or (
                cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            save_progress(s, ckpt_root, progress, stream, learner)
        if failed:
            raise RuntimeError(
                f"{progress.skips} consecutive steps had non-finite loss or gradients; stopped at "
                f"step {step} with a checkpoint of the last good state in {ckpt_root}"
            )
        if no_reward:
            raise RuntimeError(
                f"reward {cfg.reward.name!r}: its workers did not start in {reward_down} "
                f"consecutive rollout batches ({pool.last_start_failure or 'on another rank'}); "
                f"every sample scored 0. Stopped after step {step} with a checkpoint in "
                f"{ckpt_root}; fix the reward (or raise reward.max_start_failures) and resume"
            )
        if stopped:
            print(f"vp2o: stop signal: checkpoint of step {step + 1} written to {ckpt_root}; "
                  "exiting (resume continues from it)", flush=True)
            return {**to_python(metrics), "stopped_at_step": step + 1}
    result = evaluate(s, pool)
    progress.history.add(cfg.train.steps, result)
    if s.is_main:  # the final evaluation, and the average over every evaluation (history)
        write_eval(s.run_dir, result, history=progress.history)
    return {**to_python(metrics), **result}


def _vp2o_budgets(s: Session, learner: Learner, progress: Progress, check: dict,
                  more: bool) -> bool:
    """VP2O's decisions on the update just taken (method §10-§11): keep it or roll it back, and
    whether the batch must be refreshed (no more updates on it). Adds ``trust/accepted``."""
    cfg = s.cfg
    refresh = False
    if "trust/anchor_distance" in check:  # §10: the anchor budget (trust region on)
        accepted = bool(check["trust/anchor_distance"] <= cfg.vp2o.trust_region.delta)  # sync
        check["trust/accepted"] = float(accepted)
        progress.rejected = 0 if accepted else progress.rejected + 1
        if not accepted:
            refresh = True
            if learner.rollback is not None:
                learner.undo()
                _warn_repeated_rejections(s, progress.rejected, check)
    b = cfg.vp2o.behavior
    if more and (float(check["behavior/drift_after"]) > b.eps_drift  # sync
                 or float(check["behavior/ess_after"]) < b.ess_min):  # §11
        refresh = True
    return refresh


def _combine_updates(updates: list[dict]) -> dict:
    """One step's metrics from its learner updates: times and event counts add up, every other
    scalar is the mean over the updates that logged it; a vector (e.g. ``experts/load``) is the
    last update's."""
    if len(updates) == 1:
        return updates[0]
    out: dict = {}
    for key in dict.fromkeys(k for u in updates for k in u):
        values = [u[key] for u in updates if u.get(key) is not None]
        if not values:
            continue
        if any(torch.is_tensor(v) and v.numel() != 1 or isinstance(v, list | tuple)
               for v in values):
            out[key] = values[-1]
            continue
        total = sum(float(v) for v in values)  # sync (one per key; these are scalars)
        out[key] = total if key.startswith(("perf/", "events/")) else total / len(values)
    return out


def _warn_repeated_rejections(s: Session, rejected: int, check: dict) -> None:
    """A rollback restores the optimizer state too, so the retry on the next batch takes about
    the same step again: without a change it never passes."""
    if rejected in (10, 100, 1000) and s.is_main:
        print(f"vp2o: warning: the anchor trust region rejected {rejected} consecutive steps "
              f"(D = {float(check['trust/anchor_distance']):.3g} > vp2o.trust_region.delta = "
              f"{s.cfg.vp2o.trust_region.delta}); each retry repeats about the same update: "
              "lower optimizer.lr or raise vp2o.trust_region.delta", flush=True)


# ------------------------------------------------------------------ trainer state in checkpoints
TOTALS = {
    "generated_tokens": "rollout/generated_tokens",
    "samples": "rollout/samples",
    "prompts": "rollout/prompts",
    "updates": "train/updates",
    "wall_s": "perf/step_s",
}
"""Cumulative counters (``progress/<name>``) and the per-step metric each one adds up: the
x-axes on which runs with the same data budget are compared (benchmarks/study.py)."""


@dataclass
class Progress:
    """Where the run is: the loop's state that checkpoints carry besides weights and optimizer.

    Attributes:
        step: the next loop step.
        pending: this rank's rollout batch still being learned from, or None.
        skips: consecutive non-finite steps.
        prompts: the prompt stream's state (None: from the start).
        transform: the Stein transform's prototypes and anchor (None: from the weights).
        rejected: consecutive §10 rejections (for the warning).
        totals: the run's budget so far, summed over steps (``TOTALS``).
        history: the evaluations so far (``train.eval_every``), for eval.json's average.
    """

    step: int = 0
    pending: PendingBatch | None = None
    skips: int = 0
    prompts: dict | None = None
    transform: dict | None = None
    rejected: int = 0
    totals: dict = field(default_factory=lambda: dict.fromkeys(TOTALS, 0.0))
    history: EvalHistory = field(default_factory=EvalHistory)

    def count(self, m: dict) -> None:
        """Add one step to the cumulative budget counters (``progress/*`` in metrics.jsonl)."""
        for key, source in TOTALS.items():
            self.totals[key] += float(m.get(source, 0.0))


def load_progress(s: Session, root: Path) -> Progress:
    """Resume from ``train.resume`` (weights, optimizer, scheduler and trainer state), or load
    ``train.init_checkpoint``'s weights, or start from the initialisation."""
    cfg = s.cfg
    path = _resume_path(cfg, root)
    if path is None:
        if cfg.train.init_checkpoint:
            load_initial_weights(s, cfg.train.init_checkpoint)
        return Progress()
    extra = load_checkpoint(path, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler)
    rank, world = dist.get_rank(), dist.get_world_size()
    saved = extra["pending"]  # one rollout batch per rank of the saving run
    pending = None
    if len(saved) == world:
        pending = PendingBatch.from_state(saved[rank])
    elif rank == 0:  # the same decision on every rank: an IndexError on some would hang the others
        print(f"vp2o: warning: resumed on {world} ranks from a checkpoint of {len(saved)}: its "
              "unfinished rollout batches are dropped and the next step samples fresh ones from "
              "the same prompt position", flush=True)
    if cfg.loss.kl_coeff > 0 and not cfg.train.init_checkpoint and rank == 0:
        print("vp2o: warning: resumed without train.init_checkpoint: the KL reference is the "
              "resumed weights, not the run's starting weights", flush=True)
    history = EvalHistory()
    if "eval_history" in extra:
        history.load_state_dict(extra["eval_history"])
    return Progress(step=extra["step"], pending=pending, skips=extra.get("consecutive_skips", 0),
                    prompts=extra.get("prompts", {"position": extra.get("data_position", 0)}),
                    transform=extra["transform"],
                    totals={**Progress().totals, **extra.get("totals", {})}, history=history)


def save_progress(s: Session, root: Path, progress: Progress, stream: PromptStream,
                  learner: Learner) -> None:
    """A complete checkpoint of ``progress.step`` (a collective: every rank calls it)."""
    gathered = [None] * dist.get_world_size()
    state = None if progress.pending is None else progress.pending.state_dict()
    dist.all_gather_object(gathered, state)  # each rank's batch, so any rank can resume
    extra = {
        "kind": "train",
        "step": progress.step,
        "prompts": stream.state_dict(),
        "transform": learner.transform.state_dict(),
        "pending": gathered,
        "consecutive_skips": progress.skips,
        "totals": progress.totals,
        "eval_history": progress.history.state_dict(),
        "config": to_dict(s.cfg),
    }
    save_checkpoint(root, progress.step, model=s.model, optimizer=s.optimizer,
                    scheduler=s.scheduler, extra=extra, keep_last=s.cfg.train.keep_last)


def _resume_path(cfg: Config, root: Path) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        # rank 0 repairs a same-step replacement a kill interrupted and picks the checkpoint;
        # every rank resumes from the one it picked (the ranks' own listings could differ on a
        # shared file system that caches directory entries)
        choice = [None]
        if dist.get_rank() == 0:
            recover_replaced(root)
            latest = latest_checkpoint(root)
            choice = [None if latest is None else str(latest)]
        dist.broadcast_object_list(choice, src=0)
        path = None if choice[0] is None else Path(choice[0])
    else:
        path = Path(cfg.train.resume)
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


# ------------------------------------------------------------------ stop signals
class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's ``--signal=USR1@120`` before a requeue or the time limit) ask
    the loop to checkpoint and exit cleanly at the end of the current step.

    The flag is all-reduced every step (one scalar), so every rank stops at the same step even
    when the signal reached only some of them. A context manager: the previous handlers come
    back on the way out.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def anywhere(self) -> bool:
        """True when any rank received a stop signal (a collective)."""
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")  # nccl reduces CUDA tensors only
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0])  # sync
