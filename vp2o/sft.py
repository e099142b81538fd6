"""Supervised warm start: next-token loss on the answer tokens of prompt + answer + EOS.

    vp2o sft --config examples/vp2o/configs/demo_sft.yaml [key=value ...]

Writes a checkpoint (``run_dir/checkpoints/step_*``) that ``vp2o train`` starts from with
``train.init_checkpoint``, and ``run_dir/eval.json`` with the held-out accuracy.
"""

from __future__ import annotations

import copy
import random
import time
from contextlib import closing

import torch
import torch.distributed as dist

from vp2o.config import Config, to_dict
from vp2o.data.tasks import encode_rows, is_text_or_number
from vp2o.evaluate import evaluate, write_eval
from vp2o.mcore import parallel, training
from vp2o.mcore.checkpoint import save_checkpoint
from vp2o.mcore.parallel import gather_over_data_ranks
from vp2o.metrics import MetricsLogger
from vp2o.rewards.pool import RewardPool
from vp2o.session import Session, claim_run_dir, session


def answer_text(row: dict) -> str:
    """The text SFT trains on: the row's answer, a string or a number. A list (the accepted
    answers a reward reads) or an object has no one text to train on (``ValueError``, which
    ``encode_rows`` turns into a ``DatasetError`` naming the row)."""
    answer = row["answer"]
    if not is_text_or_number(answer):
        raise ValueError(  # encode_rows names the row
            f"vp2o sft trains on the answer's text: expected a string or a number, got "
            f"{type(answer).__name__} (give SFT rows one answer; a list of accepted answers is for "
            "the reward)"
        )
    return str(answer)


def encode_example(s: Session, row: dict) -> tuple[list[int], int]:
    """(prompt + answer + EOS token ids, number of prompt tokens)."""
    prompt = s.tokenizer.encode(row["prompt"])
    answer = answer_text(row)
    full = s.tokenizer.encode(row["prompt"] + answer) + [s.tokenizer.eos_id]
    if full[: len(prompt)] != prompt:  # tokenizers that merge across the boundary
        full = prompt + s.tokenizer.encode(answer) + [s.tokenizer.eos_id]
    return full, len(prompt)


def sft_batch(s: Session, rows: list[dict]) -> dict:
    """Right-padded tokens [B, S], labels (next token) and a loss mask on answer tokens."""
    encoded = [encode_example(s, r) for r in rows]
    width = max(len(ids) for ids, _ in encoded)
    pad = s.tokenizer.pad_id
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, (ids, n_prompt) in enumerate(encoded):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, n_prompt - 1 : len(ids) - 1] = 1.0  # positions predicting answer and EOS
    labels = torch.roll(tokens, -1, dims=1)
    return {"tokens": tokens, "labels": labels, "mask": mask}


def sft(cfg: Config) -> dict:
    """Run the supervised warm start; returns the held-out evaluation."""
    cfg.require_loop("sft")  # before any process group: free when loaded with loop="sft"
    cfg = copy.deepcopy(cfg)
    cfg.optimizer.lr = cfg.sft.lr
    cfg.optimizer.warmup_steps = max(cfg.optimizer.warmup_steps, cfg.sft.steps // 20)
    claim_run_dir(cfg, "sft")
    # The data-parallel size the session will have (parallel.initialize discovers the same
    # world), checked before the model is built.
    cfg.sft.check_data_parallel(cfg.parallel.data_parallel(parallel.discover_env().world_size))
    with session(cfg, with_optimizer=True, total_steps=cfg.sft.steps) as s:
        return _sft(s)


def _sft(s: Session) -> dict:
    """``sft.batch_size`` sequences per step in all, drawn by one generator that every rank
    replays (the same global batch under any layout); data-parallel rank r trains on the r-th
    slice, and every rank divides its loss by the global answer-token count over the number of
    ranks, so the averaged gradient, the step and the logged loss are the single process's."""
    cfg = s.cfg
    dp = dist.get_world_size(s.groups.dp_cp)  # divides sft.batch_size (checked in sft)
    # Every answer encodes (the prompts were checked when the session opened): a bad row fails
    # here naming its file and line, not in whichever step first draws it.
    encode_rows(s.task.train, s.tokenizer.encode, text=answer_text, what="answer")
    per_rank = cfg.sft.batch_size // dp
    mine = slice(s.groups.dp_rank * per_rank, (s.groups.dp_rank + 1) * per_rank)
    rng = random.Random(cfg.seed)
    logger = MetricsLogger(s.run_dir, config=to_dict(cfg), run_name=s.run_dir.name,
                           wandb_mode=cfg.train.wandb_mode, wandb_project=cfg.train.wandb_project,
                           is_main=s.is_main)
    pos_cache: dict[int, torch.Tensor] = {}

    def loss_fn(model, mb):
        b, width = mb["tokens"].shape
        pos = pos_cache.setdefault(width, torch.arange(width, device=s.device).unsqueeze(0))
        per_token = model(mb["tokens"], pos.expand(b, -1), None, labels=mb["labels"])  # [B, S]
        loss = (per_token.float() * mb["mask"]).sum() / mb["total"]
        return loss, {"loss": loss.detach()}

    try:
        for step in range(cfg.sft.steps):
            t0 = time.perf_counter()
            rows = [rng.choice(s.task.train) for _ in range(cfg.sft.batch_size)][mine]
            batch = {k: v.to(s.device) for k, v in sft_batch(s, rows).items()}
            tokens = gather_over_data_ranks(batch["mask"].sum(), s.groups)
            batch["total"] = (tokens.sum().clamp_min(1) / dp).to(s.device)
            training.zero_grads(s.ddp, s.optimizer)
            outs = training.forward_backward(s.ddp, [batch], loss_fn)
            s.optimizer.step()
            s.scheduler.step(1)
            loss = gather_over_data_ranks(outs[0]["loss"], s.groups).mean()
            logger.log(step, {"loss/sft": loss, "perf/step_s": time.perf_counter() - t0,
                              "lr": s.optimizer.param_groups[0]["lr"]})
        save_checkpoint(s.run_dir / "checkpoints", cfg.sft.steps, model=s.model,
                        optimizer=s.optimizer, scheduler=s.scheduler,
                        extra={"step": cfg.sft.steps, "kind": "sft", "config": to_dict(cfg)},
                        keep_last=1)
        # the same pool as train and eval: a reward that hangs or crashes costs its sample
        with closing(RewardPool(cfg.reward.name, workers=cfg.reward.workers,
                                timeout_s=cfg.reward.timeout_s)) as pool:
            result = evaluate(s, pool)
        if s.is_main:
            write_eval(s.run_dir, result)
        return result
    finally:
        logger.close()
