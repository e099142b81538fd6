"""Typed configuration: small dataclasses, one per concern, loaded from YAML with dotted overrides.

    cfg = load_config("examples/vp2o/configs/demo_vp2o.yaml", ["train.steps=10"], loop="train")

A config is checked once, when it is loaded: unknown keys, wrong types, values out of range and
layouts that cannot be built are refused by :func:`load_config` before any process group
starts, with a :class:`ConfigError` that names the key, the value and what was expected (and
the file and line that set it). Each section checks itself (``check()`` in
:mod:`vp2o.config.sections`); the rules relating sections are :func:`cross_section_rules`; what
one loop cannot run is :mod:`vp2o.config.loops`. The entry points (``train``, ``sft``,
``run_eval``) call :meth:`Config.require_loop`, which checks a config built in Python and skips
one already checked for that loop. Files, ``defaults:`` includes and overrides:
:mod:`vp2o.config.loader`; docs/configuration.md. One function,
``vp2o.mcore.model.transformer_config``, translates this into megatron's ``TransformerConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vp2o.config.errors import ConfigError, expect
from vp2o.config.loader import apply_overrides, from_dict, read_yaml, refuse_moved, to_dict, where
from vp2o.config.loops import LOOPS, check_loop
from vp2o.config.sections import (
    AdvantageConfig,
    BehaviorConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RewardConfig,
    RolloutConfig,
    SFTConfig,
    TrainConfig,
    TrustRegionConfig,
    VP2OConfig,
)

__all__ = [
    "AdvantageConfig", "BehaviorConfig", "Config", "ConfigError", "DataConfig", "LOOPS",
    "LossConfig", "MOVED", "ModelConfig", "OptimizerConfig", "ParallelConfig", "RewardConfig",
    "RolloutConfig", "SFTConfig", "TrainConfig", "TrustRegionConfig", "VP2OConfig",
    "cross_section_rules", "from_dict", "load_config", "to_dict",
]

CLIPS = {"grpo": True, "vp2o": False}
"""``loss.clip: null`` per algorithm at one update per rollout batch: GRPO clips the ratio (§1);
VP2O does not (§2: the trust regions bound the step). With ``train.updates_per_rollout > 1``
both clip: the reused updates need an off-policy correction (docs/configuration.md)."""

_LOSS = "(the policy loss of both algorithms)"
MOVED = {
    "grpo": "the section is gone: the policy loss is the loss section (both algorithms), the "
            "group advantages the advantage section, router replay rollout.router_replay, steps "
            "per batch train.updates_per_rollout (docs/configuration.md)",
    "grpo.clip_low": f"moved to loss.clip_low {_LOSS}",
    "grpo.clip_high": f"moved to loss.clip_high {_LOSS}",
    "grpo.clip_ratio_c": f"moved to loss.clip_ratio_c {_LOSS}",
    "grpo.kl_coeff": f"moved to loss.kl_coeff {_LOSS}",
    "grpo.kl_estimator": f"moved to loss.kl_estimator {_LOSS}",
    "grpo.aggregation": f"moved to loss.aggregation {_LOSS}",
    "grpo.overlong_filter": f"moved to loss.overlong_filter {_LOSS}",
    "grpo.loss_type": "moved to loss.estimator (grpo -> ratio, gspo -> gspo; both algorithms)",
    "grpo.normalize_std": "moved to advantage.normalize_std (both algorithms)",
    "grpo.dynamic_sampling": "moved to advantage.dynamic_sampling (both algorithms)",
    "grpo.router_replay": "moved to rollout.router_replay (both algorithms)",
    "grpo.updates_per_rollout": "moved to train.updates_per_rollout (the same option for both "
                                "algorithms, default 1)",
    "vp2o.clip": "moved to loss.clip (null = the safe default: grpo true; vp2o true only "
                 "with train.updates_per_rollout > 1)",
    "vp2o.pg_estimator": "moved to loss.estimator (ratio, logprob or gspo; both algorithms)",
    "vp2o.max_updates_per_rollout": "moved to train.updates_per_rollout (the same option "
                                    "for both algorithms, default 1)",
}
"""Keys of the schema before the loss section (issue 19), each with where it went."""


@dataclass
class Config:
    """The whole run: one field per section (unknown sections are refused like unknown keys).

    Read ``loss.clip`` resolved, as :attr:`loss_clips` (its null means the safe default).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The MoE transformer."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    algorithm: Literal["grpo", "vp2o"] = "grpo"
    """grpo: clipped GRPO baseline (method §1); vp2o: Stein transport + trust regions (§2-§12)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The policy loss (both algorithms)."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Group advantages (both algorithms)."""
    vp2o: VP2OConfig = field(default_factory=VP2OConfig)
    """VP2O's transport, specialisation losses and budgets."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and tokenizer."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, logging, checkpoints."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised warm start."""
    seed: int = 1234
    """Global seed (data order, init, sampling)."""

    @property
    def loss_clips(self) -> bool:
        """Whether the policy loss clips the ratio: ``loss.clip``, or when it is null the safe
        default (grpo true; vp2o true with ``train.updates_per_rollout > 1``, else false; false
        with ``loss.estimator=logprob``)."""
        if self.loss.clip is not None:
            return self.loss.clip
        if self.loss.estimator == "logprob":
            return False
        return CLIPS[self.algorithm] or self.train.updates_per_rollout > 1

    @property
    def loss_correction(self) -> str:
        """The mismatch correction in force: ``loss.correction``, or when it is null the
        engine's default (tis for rollout.engine=vllm, none for megatron)."""
        if self.loss.correction is not None:
            return self.loss.correction
        return "tis" if self.rollout.engine == "vllm" else "none"

    @property
    def max_model_len(self) -> int:
        """vLLM's longest prompt + response in tokens: ``rollout.max_model_len``, or when it is
        null the model's ``max_position_embeddings``."""
        return self.rollout.max_model_len or self.model.max_position_embeddings

    @property
    def updates_per_rollout(self) -> int:
        """Learner updates per rollout batch (``train.updates_per_rollout``; the most for VP2O)."""
        return self.train.updates_per_rollout

    def validate(self, world_size: int | None = None) -> Config:
        """Check every section, the rules between them and, given ``world_size``, the layout.

        :func:`load_config` calls it; call it again only after changing a config in place.

        Raises:
            ConfigError: naming the key, the value and what was expected.
        """
        expect(0 <= self.seed < 2**31, "seed", self.seed,
               "an integer in [0, 2**31) (the data order, init and sampling derive from it)")
        for section in (self.model, self.parallel, self.optimizer, self.loss, self.vp2o,
                        self.data, self.rollout, self.reward, self.train, self.sft):
            section.check()
        cross_section_rules(self)
        if world_size is not None:
            self.parallel.check_world(world_size)
            tp = self.rollout.tensor_parallel
            expect(world_size % tp == 0, "rollout.tensor_parallel", tp,
                   f"a divisor of the world size ({world_size} processes): one engine per group "
                   "of rollout.tensor_parallel ranks")
        self._record(None)
        return self

    def require_loop(self, loop: str) -> Config:
        """Check this config for ``loop`` (``sft``, ``train`` or ``eval``: the checks of
        :meth:`validate` and the loop's rules, :mod:`vp2o.config.loops`), unless it was already
        checked for that loop and has not changed since (a config that
        ``load_config(..., loop=loop)`` returned costs nothing).

        Raises:
            ConfigError: naming the key, the value and what was expected.
        """
        snapshot = to_dict(self)
        checked = vars(self).get("_checked", {})
        if checked.get(loop) == snapshot:
            return self
        if checked.get(None) != snapshot:
            self.validate()
        check_loop(loop, model=self.model, parallel=self.parallel, rollout=self.rollout,
                   train=self.train)
        self._record(loop, snapshot)
        return self

    def _record(self, loop: str | None, snapshot: dict | None = None) -> None:
        """Remember that the current contents passed the checks of ``loop`` (None: validate)."""
        vars(self).setdefault("_checked", {})[loop] = snapshot or to_dict(self)


def cross_section_rules(cfg: Config) -> None:
    """The rules that relate sections (each section's own are its ``check()``).

    Raises:
        ConfigError: naming the key, the value and what was expected.
    """
    m, p, loss = cfg.model, cfg.parallel, cfg.loss
    p.check_model(m)
    if cfg.optimizer.name == "sgd":
        expect(not p.use_distributed_optimizer, "parallel.use_distributed_optimizer", True,
               "false with optimizer.name=sgd (megatron's DistributedOptimizer is Adam-only)")
    if m.position_embedding_type == "learned_absolute":
        longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        expect(longest <= m.max_position_embeddings, "model.max_position_embeddings",
               m.max_position_embeddings, f">= data.max_prompt_tokens + rollout.max_new_tokens "
               f"({longest}) with learned absolute positions")
    if cfg.rollout.router_replay:
        expect(m.moe_enable_routing_replay, "model.moe_enable_routing_replay", False,
               "true when rollout.router_replay is on (routers are built with RouterReplay)")
    if cfg.rollout.engine == "vllm":
        longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        expect(cfg.max_model_len >= longest, "rollout.max_model_len", cfg.max_model_len,
               f">= data.max_prompt_tokens + rollout.max_new_tokens ({longest}) with "
               "rollout.engine=vllm")
        sizes = {"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
                 "expert_tensor_parallel": p.etp}  # etp: null follows tensor_parallel
        for key, size in sizes.items():
            expect(size == 1, f"parallel.{key}", size, "1 with rollout.engine=vllm (the weight "
                   "sync streams whole parameters to each rank's engine: data and expert "
                   "parallelism only; rollout.engine=megatron runs the other layouts, "
                   "docs/rollout.md)")
        expect(cfg.max_model_len <= m.max_position_embeddings, "rollout.max_model_len",
               cfg.max_model_len, f"<= model.max_position_embeddings "
               f"({m.max_position_embeddings}): vLLM reads it from the model's config")
    if loss.clip_ratio_c is not None:
        expect(cfg.loss_clips, "loss.clip_ratio_c", loss.clip_ratio_c,
               f"null when the ratio is not clipped (loss.clip = {loss.clip!r} with "
               f"algorithm={cfg.algorithm}; the dual clip bounds a clipped ratio: set "
               "loss.clip=true to clip)")
    if loss.estimator == "logprob":
        expect(cfg.updates_per_rollout == 1, "train.updates_per_rollout",
               cfg.updates_per_rollout,
               "1 with loss.estimator=logprob (no importance ratio corrects the loss on a "
               "batch that earlier steps already changed the policy on)")
    if cfg.algorithm == "vp2o":
        expect(p.etp == 1, "parallel.expert_tensor_parallel", p.etp,
               "1 with algorithm=vp2o (the repulsion differentiates a power iteration through "
               "whole expert weights; megatron also recommends ETP=1 for MoE)")
        expect(not p.overlap_grad_reduce, "parallel.overlap_grad_reduce", True,
               "false with algorithm=vp2o: the Stein transform mixes expert gradients before "
               "they are reduced, so the reduction cannot start during backward")
        v = cfg.vp2o
        if not v.transport_specialisation and (v.ortho_coeff > 0 or v.variance_coeff > 0):
            expect(m.recompute == "none", "model.recompute", m.recompute,
                   "none with vp2o.transport_specialisation=false (the specialisation losses' "
                   "expert gradients come from a second backward, which megatron's activation "
                   "checkpointing does not support)")
        if cfg.vp2o.ortho_coeff > 0:
            # The orthogonality loss reads each token's k expert outputs before megatron sums
            # them (VP2OMoELayer.postprocess): only the alltoall dispatcher hands them over
            # there; allgather (any EP x TP) sums them inside its combine_preprocess.
            expect(m.moe_token_dispatcher_type == "alltoall", "model.moe_token_dispatcher_type",
                   m.moe_token_dispatcher_type,
                   "alltoall when algorithm=vp2o and vp2o.ortho_coeff > 0 (the orthogonality "
                   "loss needs each token's expert outputs before they are summed; or set "
                   "vp2o.ortho_coeff=0)")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    world_size: int | None = None,
    loop: str | None = None,
) -> Config:
    """Load a :class:`Config` from YAML (or the defaults), apply dotted overrides, and check it.

    Args:
        path: YAML file (its ``defaults:`` files are merged first); None starts from the
            defaults.
        overrides: dotted assignments, values parsed as YAML (``model.num_experts=16``,
            ``model.moe_layer_freq=[1,0,1,0]``).
        world_size: if given, the parallel layout is checked against it too.
        loop: ``sft``, ``train`` or ``eval``: also check what that loop cannot run
            (:mod:`vp2o.config.loops`); its ``Config.require_loop`` is then free.

    Raises:
        ConfigError: malformed YAML (with the file and line), unknown or moved keys, wrong
            types, values out of range, or an inconsistent layout; a value read from a file is
            named with that file and line.
    """
    raw, origins = read_yaml(path) if path is not None else ({}, {})
    apply_overrides(raw, list(overrides or []), origins)
    try:
        refuse_moved(raw, MOVED)
        cfg = from_dict(Config, raw).validate(world_size)
        if loop is not None:
            cfg.require_loop(loop)
    except ConfigError as e:
        raise where(e, origins) from None
    return cfg
