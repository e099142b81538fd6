"""What every vp2o job sets up first: process groups, tokenizer, data, model, optimizer.

``vp2o sft``, ``vp2o train`` and ``vp2o eval`` share it, so a model trained by one loads in the
others with the same shapes and the same tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vp2o.config import Config, ConfigError
from vp2o.data.tasks import (
    BUILTIN_TASKS,
    TaskSplit,
    check_prompt_lengths,
    encode_rows,
    load_task,
)
from vp2o.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer
from vp2o.mcore import model as mdl
from vp2o.mcore import parallel, training, vp2o_moe
from vp2o.mcore.checkpoint import checkpoints_of_other_kinds
from vp2o.mcore.parallel import ParallelGroups


@dataclass
class Session:
    """One rank's handles. ``model`` is the unwrapped GPTModel, ``ddp`` its megatron DDP wrap."""

    cfg: Config
    groups: ParallelGroups
    run_dir: Path
    tokenizer: Tokenizer
    task: TaskSplit
    model: object
    ddp: object | None = None
    optimizer: object | None = None
    scheduler: object | None = None
    closers: list = field(default_factory=list)
    """Callables run (last added first) when the session ends, before the process groups go:
    what a higher layer builds on the session (a rollout engine) registers its own teardown."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, reports and evaluation files."""
        return torch.distributed.get_rank() == 0

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.model.parameters()).device


def prepare_tokenizer(cfg: Config, run_dir: Path, task: TaskSplit) -> Tokenizer:
    """Load ``data.tokenizer_path``, or train a sentencepiece model on the task text (rank 0
    trains, the others wait and load the same file)."""
    d = cfg.data
    if d.tokenizer_path:
        return load_tokenizer(d.tokenizer, d.tokenizer_path)
    if d.task not in BUILTIN_TASKS:
        raise ConfigError(
            f"data.tokenizer_path = None: expected a tokenizer file for data.task={d.task!r} "
            "(a tokenizer is trained here only for the built-in tasks)"
        )
    path = run_dir / "tokenizer.model"
    if torch.distributed.get_rank() == 0 and not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        SentencePieceTokenizer.train(
            BUILTIN_TASKS[d.task].corpus(task.train + task.eval),
            model_prefix=str(run_dir / "tokenizer"),
            vocab_size=d.tokenizer_vocab_size,
            model_type="char",
            add_dummy_prefix=False,  # encode(prompt + answer) starts with encode(prompt)
        )
    torch.distributed.barrier()
    return SentencePieceTokenizer.load(path)


@contextlib.contextmanager
def session(cfg: Config, *, with_optimizer: bool, total_steps: int = 1) -> Iterator[Session]:
    """``open_session`` for a ``with`` block; the process groups are torn down on the way out
    (error or not, also when opening fails half-way), so a job can run the next one."""
    s = None
    try:
        s = open_session(cfg, with_optimizer=with_optimizer, total_steps=total_steps)
        yield s
    finally:
        try:
            while s is not None and s.closers:
                s.closers.pop()()
        finally:
            parallel.destroy()


def open_session(cfg: Config, *, with_optimizer: bool, total_steps: int = 1) -> Session:
    """Initialise parallelism, data, tokenizer and the model (VP2O layer spec in both modes: the
    routing statistics feed the diagnostics either way; the transform and the specialisation
    losses are switched on only for ``algorithm=vp2o``).

    The config is the entry point's, already checked for its loop (``Config.require_loop``)."""
    groups = parallel.initialize(cfg)
    run_dir = Path(cfg.train.run_dir)
    task = load_task(cfg.data, seed=cfg.seed)
    tokenizer = prepare_tokenizer(cfg, run_dir, task)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size = {cfg.model.vocab_size}: expected >= the tokenizer's vocabulary "
            f"({tokenizer.vocab_size})"
        )
    for split in (task.train, task.eval):
        encoded = encode_rows(split, tokenizer.encode)  # file:line of a prompt it cannot encode
        check_prompt_lengths(split, encoded, cfg.data.max_prompt_tokens)
    torch.manual_seed(cfg.seed)
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    if cfg.algorithm == "vp2o":
        vp2o_moe.configure_losses(
            model, ortho_coeff=cfg.vp2o.ortho_coeff, variance_coeff=cfg.vp2o.variance_coeff,
            ortho_normalize=cfg.vp2o.ortho_normalize,
        )
    session = Session(cfg, groups, run_dir, tokenizer, task, model)
    if with_optimizer:
        session.ddp = training.wrap_ddp(model, cfg)
        session.optimizer = training.build_optimizer(session.ddp, cfg)
        session.scheduler = training.build_scheduler(session.optimizer, cfg, total_steps)
    return session


def claim_run_dir(cfg: Config, kind: str) -> None:
    """Refuse a ``train.run_dir`` whose checkpoints another loop wrote (call before starting).

    ``vp2o sft`` keeps only its newest checkpoint and ``vp2o train`` prunes to
    ``train.keep_last`` and resumes from the newest one: run in another loop's folder, the first
    would delete that loop's checkpoints and the second resume from a checkpoint it cannot use.

    Raises:
        ConfigError: naming ``train.run_dir``, the other loop and its newest checkpoint.
    """
    others = checkpoints_of_other_kinds(Path(cfg.train.run_dir) / "checkpoints", kind)
    if not others:
        return
    newest, other = others[-1]
    writer = f"vp2o {other}" if other else "another loop"
    hint = (f" (to start RL from it: train.init_checkpoint={newest} with a new train.run_dir)"
            if kind == "train" and other == "sft" else "")
    raise ConfigError(
        f"train.run_dir = {cfg.train.run_dir!r}: expected a new folder or one of an earlier "
        f"vp2o {kind}; its checkpoints/ holds {len(others)} checkpoint(s) written by {writer} "
        f"(newest {newest.name}), which vp2o {kind} would prune or resume from: choose another "
        f"train.run_dir{hint}"
    )


def load_initial_weights(s: Session, path: str | Path) -> Path:
    """Load ``train.init_checkpoint`` weights (no optimizer state) into ``s.model``.

    ``path`` may be a training checkpoint (``step_*``), a folder of them (its newest complete one
    is taken), or a checkpoint converted from Hugging Face (``vp2o convert``, it holds
    ``convert.json``). Returns the checkpoint actually loaded.
    """
    from vp2o.mcore.checkpoint import MARKER, CheckpointError, latest_checkpoint, load_checkpoint

    path = Path(path)
    if (path / "convert.json").exists():
        from vp2o.convert import load_model_weights

        load_model_weights(s.model, path)
        return path
    if path.is_dir() and not (path / MARKER).exists():  # a folder of checkpoints
        newest = latest_checkpoint(path)
        if newest is None:
            steps = sorted(p.name for p in path.glob("step_*"))
            raise CheckpointError(
                f"train.init_checkpoint = {str(path)!r}: no complete checkpoint in it"
                + (f" ({', '.join(steps)}: no readable {MARKER}, saves that did not finish?)"
                   if steps else " (expected a step_* checkpoint, a folder of them, or a "
                   "converted checkpoint with convert.json)")
            )
        path = newest
    load_checkpoint(path, model=s.model, optimizer=None, scheduler=None)
    return path
