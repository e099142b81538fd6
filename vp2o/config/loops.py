"""What each loop can run: rules that ``vp2o sft``, ``vp2o train`` and ``vp2o eval`` add to the
checks every config passes.

A config that loads may still hold settings one loop cannot run correctly; they are refused
when the config is loaded for that loop (``load_config(..., loop=...)``) or when the loop
starts (``Config.require_loop``), before any process group exists, so they fail at once and not
after the model is built and a checkpoint loaded.

- every loop (``sft``, and the others too): context parallelism (megatron-core expects the
  caller to hand each CP rank its own slices of every sequence and to combine the per-token
  losses across the CP group; vp2o's loops hand every rank whole sequences, and under
  transformer-engine attention CP > 1 would train on wrong attention without an error), and
  fp16 parameters (vp2o sets no loss scale, so megatron's fp16 optimizer divides the gradients
  by a dynamic scale that starts at 2^32: nothing is learned);
- the loops that generate (``train``, ``eval``): TP = PP = 1 (the rollout runs so,
  docs/rollout.md), megatron's local transformer spec (the rollout's padded batches need its
  attention: transformer-engine's ignores the padding mask), and a temperature > 0 when several
  samples per prompt are scored;
- RL training (``train``): no dropout (behaviour log-probs are recorded in eval mode, the
  learner's in train mode: dropout alone would make every step off-policy) and a sampling
  temperature > 0 (greedy samples of a group are identical: every advantage is 0).

``vp2o launch`` plans any layout megatron accepts (it checks the rules every loop shares) and
``vp2o convert`` writes fp16 (docs/scaling.md).
"""

from __future__ import annotations

from typing import Literal

from vp2o.config.errors import ConfigError, expect
from vp2o.config.sections import ModelConfig, ParallelConfig, RolloutConfig, TrainConfig

Loop = Literal["sft", "train", "eval"]
LOOPS: tuple[str, ...] = ("sft", "train", "eval")


def check_loop(loop: str, *, model: ModelConfig, parallel: ParallelConfig,
               rollout: RolloutConfig, train: TrainConfig) -> None:
    """Refuse what ``loop`` (``sft``, ``train`` or ``eval``) cannot run correctly.

    Raises:
        ConfigError: naming the key, its value and what was expected.
    """
    if loop not in LOOPS:
        raise ConfigError(f"loop = {loop!r}: expected one of {', '.join(LOOPS)}")
    _every_loop(model, parallel)
    if loop in ("train", "eval"):
        _generating(model, parallel, rollout, train)
    if loop == "train":
        _rl(model, rollout)


def _every_loop(m: ModelConfig, p: ParallelConfig) -> None:
    expect(p.context_parallel == 1, "parallel.context_parallel", p.context_parallel,
           "1 for vp2o sft/train/eval (the loops give every rank whole sequences; splitting "
           "them over context-parallel ranks is not implemented, docs/scaling.md)")
    expect(m.params_dtype != "fp16", "model.params_dtype", m.params_dtype,
           "fp32 or bf16 for vp2o sft/train/eval (fp16 needs a loss scale, which vp2o does not "
           "set: the updates would be ~0)")


def _generating(m: ModelConfig, p: ParallelConfig, r: RolloutConfig, t: TrainConfig) -> None:
    expect(t.eval_samples == 1 or r.temperature > 0, "rollout.temperature", r.temperature,
           f"> 0 with train.eval_samples = {t.eval_samples} (greedy samples of a prompt are "
           "identical: pass@k would be pass@1)")
    for key in ("tensor_parallel", "pipeline_parallel"):
        expect(getattr(p, key) == 1, f"parallel.{key}", getattr(p, key),
               "1 for vp2o train/eval (their rollout generation runs TP = PP = 1, "
               "docs/rollout.md)")
    # "auto" would build the transformer-engine spec wherever TE imports (a GPU machine with
    # vp2o[te]): refused on every machine, so that a config checked on a laptop runs on the
    # cluster too.
    expect(m.transformer_impl == "local", "model.transformer_impl", m.transformer_impl,
           "local for vp2o train/eval (their rollout's padded batches need megatron's local "
           "attention: transformer-engine's ignores the padding mask, docs/rollout.md)")


def _rl(m: ModelConfig, r: RolloutConfig) -> None:
    for key in ("hidden_dropout", "attention_dropout"):
        expect(getattr(m, key) == 0, f"model.{key}", getattr(m, key),
               "0 for vp2o train (rollouts are sampled without dropout and the learner would "
               "apply it: every step would be off-policy)")
    expect(r.temperature > 0, "rollout.temperature", r.temperature,
           "> 0 for vp2o train (greedy samples of a group are identical, so every advantage "
           "is 0)")
