"""Typed configuration: small dataclasses, one per concern, loaded from YAML with dotted overrides.

    cfg = load_config("examples/vp2o/configs/tiny.yaml", overrides=["model.num_experts=16"])

Every field has a docstring-style comment: meaning, range, and where the default comes from.
Unknown keys, wrong types and layouts that cannot be built are rejected by :func:`load_config` /
:meth:`Config.validate` *before* any process group starts, with a :class:`ConfigError` that names
the key, the value and what was expected. Derived values are properties. One function,
``vp2o.mcore.model.transformer_config``, translates this into megatron's ``TransformerConfig``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type, or inconsistent."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The MoE transformer. Field names follow megatron-core where one exists.

    The defaults are the embedded tiny model (4 layers, d=128, 8 experts, top-2): a shape that
    runs on a laptop CPU and exercises every MoE code path.
    """

    num_layers: int = 4
    """Transformer layers (>= 1)."""
    hidden_size: int = 128
    """Model width d."""
    num_attention_heads: int = 4
    """Query heads; must be divisible by parallel.tensor_parallel."""
    num_query_groups: int | None = 2
    """KV heads for grouped-query attention; None = multi-head (one KV head per query head)."""
    kv_channels: int | None = None
    """Head dimension; None = hidden_size / num_attention_heads (Qwen3 sets it explicitly)."""
    ffn_hidden_size: int = 256
    """FFN width of dense (non-MoE) layers."""
    vocab_size: int = 512
    """Vocabulary size (padded up to a multiple of make_vocab_size_divisible_by * TP)."""
    make_vocab_size_divisible_by: int = 1
    """Pad the embedding table to a multiple of this (x TP). 128 is megatron's GPU default."""
    max_position_embeddings: int = 4096
    """Longest sequence (prompt + response) the model is built for."""
    position_embedding_type: Literal["rope", "learned_absolute", "none"] = "rope"
    """Positional encoding. RoPE for every supported family."""
    rotary_base: int = 10000
    """RoPE base (Qwen3: 1_000_000, Mixtral: 1_000_000, Qwen2: 1_000_000)."""
    rotary_percent: float = 1.0
    """Fraction of the head dimension rotated."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm type."""
    norm_epsilon: float = 1e-6
    """Norm epsilon."""
    qk_layernorm: bool = False
    """Norm on queries and keys after the QKV projection (Qwen3-MoE, OLMoE); its extent is
    qk_layernorm_scope."""
    qk_layernorm_scope: Literal["head", "full"] = "head"
    """What qk_layernorm normalises. "head": each head separately over head_dim features, one
    [head_dim] weight shared by all heads (megatron's qk_layernorm; Qwen3-MoE). "full": each
    token's whole q projection (num_attention_heads * head_dim features) and k projection
    (num_query_groups * head_dim), one RMS statistic per token, weights of those widths (OLMoE;
    vp2o.mcore.qk_norm). "full" needs qk_layernorm, RMSNorm and parallel.tensor_parallel = 1."""
    add_bias_linear: bool = False
    """Biases in linear layers (none in every supported family)."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2-MoE)."""
    gated_linear_unit: bool = True
    """SwiGLU experts and MLPs (fc1 holds [gate; up])."""
    activation: Literal["silu", "gelu"] = "silu"
    """Activation inside the (gated) MLP."""
    untie_embeddings_and_output_weights: bool = True
    """Separate output layer (True for Qwen3-MoE-30B, Mixtral); False ties it to the embedding."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (0 for RL)."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches (0 for RL)."""

    # --- MoE ---
    num_experts: int = 8
    """Routed experts E per MoE layer (>= 2)."""
    moe_router_topk: int = 2
    """Experts per token k (1 <= k <= num_experts)."""
    moe_ffn_hidden_size: int = 128
    """Routed expert FFN width f."""
    moe_layer_freq: int | list[int] = 1
    """1 = every layer is MoE; N = every N-th; a 0/1 list of length num_layers picks exactly."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function (sigmoid for DeepSeek-V3-style routers)."""
    moe_router_pre_softmax: bool = False
    """softmax over all experts before top-k (Qwen2-MoE, norm_topk_prob=False); False = top-k
    then softmax over the selected, i.e. renormalised gates (Qwen3-MoE, Mixtral, OLMoE)."""
    moe_router_topk_scaling_factor: float | None = None
    """Multiply the gates by this (DeepSeek); None = 1."""
    moe_shared_expert_intermediate_size: int | None = None
    """Shared-expert FFN width (Qwen2-MoE); None = no shared expert."""
    moe_shared_expert_gate: bool = False
    """Sigmoid gate on the shared expert's output (Qwen2-MoE)."""
    moe_grouped_gemm: bool = False
    """Grouped-GEMM experts (GPU: TEGroupedMLP / GroupedMLP). False = SequentialMLP (CPU)."""
    moe_token_dispatcher_type: Literal["allgather", "alltoall", "flex"] = "alltoall"
    """Token dispatcher. alltoall is megatron's recommendation with EP > 1 and what VP2O's
    orthogonality loss needs (``vp2o.ortho_coeff > 0``); flex needs DeepEP."""
    moe_aux_loss_coeff: float = 0.0
    """megatron's load-balancing loss coefficient (0 = off; RL usually keeps it off)."""
    moe_router_load_balancing_type: Literal[
        "aux_loss", "seq_aux_loss", "global_aux_loss", "none"
    ] = "none"
    """megatron's load-balancing loss type, used when moe_aux_loss_coeff > 0."""
    moe_enable_routing_replay: bool = False
    """Build routers with megatron's RouterReplay (record actor routing, replay it in the
    learner: GRPO's R3 option)."""
    moe_router_dtype: Literal["fp32", "fp64"] | None = "fp32"
    """Router computation dtype: fp32 keeps routing identical across bf16/fp32 runs."""

    # --- numerics and memory ---
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter dtype. bf16 on GPUs (with fp32 main grads and optimizer state)."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recompute granularity."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recompute chunk (uniform method)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "local"
    """local = megatron's local spec (what vp2o train/eval need: their rollout's padded batches
    need its attention, docs/rollout.md); auto = the transformer-engine spec when TE imports and
    CUDA is present, else local (e.g. for vp2o sft: megatron maps the local spec's checkpoint
    keys to the transformer-engine spec's)."""

    @property
    def head_dim(self) -> int:
        """Per-head dimension."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def moe_layer_pattern(self) -> list[int]:
        """0/1 per layer: 1 where the layer is MoE."""
        if isinstance(self.moe_layer_freq, list):
            return list(self.moe_layer_freq)
        return [1 if i % self.moe_layer_freq == 0 else 0 for i in range(self.num_layers)]

    @property
    def num_moe_layers(self) -> int:
        """Number of MoE layers."""
        return sum(self.moe_layer_pattern)


@dataclass
class ParallelConfig:
    """Parallel layout. world = TP * PP * CP * DP; experts: world / PP = ETP * EP * expert-DP."""

    tensor_parallel: int = 1
    """Tensor-parallel size (TP). MoE with TP > 1 needs sequence_parallel."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (PP); must divide model.num_layers."""
    context_parallel: int = 1
    """Context-parallel size (CP); vp2o sft/train/eval need 1 (``Config.check_loop_settings``)."""
    expert_parallel: int = 1
    """Expert-parallel size (EP); must divide model.num_experts."""
    expert_tensor_parallel: int | None = 1
    """Expert tensor-parallel size (ETP); None = same as TP. 1 is megatron's MoE recommendation."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (required for MoE when TP > 1)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (megatron DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient reduction with backward."""
    overlap_param_gather: bool = False
    """Must stay false. megatron's option defers the distributed optimizer's parameter all-gather
    to the next forward's pre-hooks, so until then each rank's weights are updated only in the
    shard it owns. The RL loop reads the weights outside a forward right after the step (the
    prototype refresh, checkpoints, rollback), and every forward that follows the step needs
    them all (the post-update check, generation): there is no forward to hide the gather behind,
    only stale weights to read."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo without."""
    timeout_minutes: int = 30
    """Collective timeout: a rank that dies makes the others fail after at most this long."""

    @property
    def model_parallel_size(self) -> int:
        """TP * PP * CP: the ranks one data-parallel replica spans."""
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    @property
    def etp(self) -> int:
        """Resolved expert tensor-parallel size."""
        return self.expert_tensor_parallel or self.tensor_parallel

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel size for ``world_size`` ranks."""
        return world_size // self.model_parallel_size


@dataclass
class OptimizerConfig:
    """AdamW (or SGD) through megatron's optimizer, with warmup + cosine decay."""

    name: Literal["adam", "sgd"] = "adam"
    """Optimizer (adam = AdamW with decoupled weight decay)."""
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    sgd_momentum: float = 0.0
    """SGD momentum (tests use plain SGD for exact parameter comparisons)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    warmup_steps: int = 0
    """Linear warmup optimizer steps."""
    decay_style: Literal["cosine", "constant", "linear"] = "cosine"
    """Decay after warmup."""
    grad_reduce_in_fp32: bool = True
    """Reduce gradients in fp32 (main grads) even with bf16 params."""


@dataclass
class DataConfig:
    """Prompts, answers and the tokenizer."""

    task: str = "arith"
    """Built-in task (``arith``: multi-step integer arithmetic, shipped as code) or ``jsonl``."""
    train_path: str | None = None
    """JSONL of training rows (task=jsonl): one object per line with prompt_field, answer_field."""
    eval_path: str | None = None
    """JSONL of held-out rows (task=jsonl)."""
    prompt_field: str = "prompt"
    """Key of the prompt text in a JSONL row."""
    answer_field: str = "answer"
    """Key of the reference answer in a JSONL row (the reward function reads the whole row)."""
    max_prompt_tokens: int = 64
    """Prompts longer than this are rejected with the file and line (no silent truncation)."""
    num_train_prompts: int = 4000
    """Built-in task: training prompts generated."""
    num_eval_prompts: int = 200
    """Held-out prompts scored by evaluation (built-in task: generated disjoint from training)."""
    tokenizer: Literal["sentencepiece", "char", "hf"] = "sentencepiece"
    """Tokenizer kind (vp2o.data.tokenizer registry)."""
    tokenizer_path: str | None = None
    """Tokenizer model file or directory; None trains a sentencepiece model on the task text
    into the run directory (built-in task only)."""
    tokenizer_vocab_size: int = 64
    """Vocabulary of a tokenizer trained here (built-in task)."""


@dataclass
class RolloutConfig:
    """Generation by the actors (method §12)."""

    prompts_per_step: int = 16
    """Prompts per rollout batch (per data-parallel rank)."""
    group_size: int = 8
    """Samples per prompt G (>= 2: group advantages need a group)."""
    temperature: float = 1.0
    """Sampling temperature; the behaviour log-probs are taken at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    max_new_tokens: int = 16
    """Longest response."""
    stop_strings: list[str] = field(default_factory=list)
    """Extra stop strings (EOS always stops)."""
    micro_batch_size: int = 64
    """Sequences per learner micro-batch (gradient accumulation over micro-batches)."""


@dataclass
class GRPOConfig:
    """The policy loss and the GRPO-family options (method §1; verl/TRL/DAPO variants)."""

    clip_low: float = 0.2
    """epsilon_low of the clipped ratio."""
    clip_high: float = 0.2
    """epsilon_high (DAPO's clip-higher uses 0.28)."""
    clip_ratio_c: float | None = None
    """Dual-clip bound c for negative advantages (None = off)."""
    normalize_std: bool = True
    """Divide advantages by the group std (false: Dr. GRPO)."""
    aggregation: str = "token_mean"
    """Loss aggregation: token_mean, seq_mean_token_mean, seq_mean_token_sum,
    seq_mean_token_sum_norm."""
    loss_type: Literal["grpo", "gspo"] = "grpo"
    """Token-level ratios (grpo) or sequence-level ratios (gspo)."""
    kl_coeff: float = 0.0
    """beta_KL of the KL penalty to the reference model (0 = no reference model is kept)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3."""
    updates_per_rollout: int = 1
    """GRPO: learner steps per rollout batch (fixed refresh schedule)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage)."""
    overlong_filter: bool = False
    """Mask out responses truncated at max_new_tokens."""
    router_replay: bool = False
    """R3: replay the actors' routing in the learner forward (needs
    model.moe_enable_routing_replay)."""


@dataclass
class RewardConfig:
    """Reward function and its worker pool."""

    name: str = "exact"
    """Registered reward name (vp2o.rewards.available()) or a dotted path module:function."""
    workers: int = 2
    """Worker processes scoring completions."""
    timeout_s: float = 10.0
    """Per-sample timeout: a hung reward scores 0 and is counted."""


@dataclass
class TrainConfig:
    """The loop, evaluation, logging and checkpoints."""

    steps: int = 100
    """Learner optimizer steps."""
    run_dir: str = "runs/default"
    """Output directory: metrics.jsonl, checkpoints/, wandb/, eval.json."""
    init_checkpoint: str | None = None
    """Start from these weights (e.g. an SFT checkpoint); optimizer state is not loaded."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in run_dir; never; or a path."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept in run_dir/checkpoints (>= 1; older ones are deleted)."""
    eval_every: int = 0
    """Evaluate held-out accuracy every N steps (0 = only at the end)."""
    eval_samples: int = 1
    """Samples per held-out prompt at evaluation (pass@k for k <= this)."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline needs no network (wandb sync uploads later)."""
    wandb_project: str = "vp2o"
    """wandb project."""
    max_consecutive_skips: int = 5
    """Stop (with a checkpoint of the last good state) after this many non-finite steps."""


@dataclass
class SFTConfig:
    """Supervised warm start (``vp2o sft``): next-token loss on prompt + answer."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step in all (split over the data-parallel ranks: a multiple of their
    number)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW, warmup then cosine)."""


@dataclass
class TrustRegionConfig:
    """Anchor prototype budget (method §10)."""

    delta: float = 0.05
    """Accept a learner step iff the mean barycenter distance D <= delta (method default 0.05).
    If a single optimizer step already moves D past delta, rollbacks repeat (the restored
    optimizer state gives the same step size): the trainer warns after 10 in a row."""
    on_violation: Literal["rollback", "refresh"] = "rollback"
    """rollback: restore parameters and optimizer state from before the step, then refresh the
    actors; refresh: keep the step and refresh (method §10)."""


@dataclass
class BehaviorConfig:
    """On-policy behaviour budget (method §11)."""

    lam: float = 0.5
    """Tempering lambda of the importance weights w = exp(lambda * sum log rho) (method: 0.5)."""
    eps_drift: float = 0.1
    """Refresh when the mean |log rho| over response tokens exceeds this (method: 0.1)."""
    ess_min: float = 0.5
    """Refresh when the normalised effective sample size falls below this (method: 0.5)."""
    ess_level: Literal["sequence", "token"] = "sequence"
    """ESS over sequences (default) or over tokens (for 8K-16K-token responses)."""


@dataclass
class VP2OConfig:
    """VP2O's choices (method §2-§11); each default is the method's."""

    alpha: float = 0.1
    """Repulsion weight alpha in g~ = phi_att + alpha phi_rep (§8)."""
    tau0: float = 1.0
    """Kernel temperature numerator: tau = tau0 / log E (§5)."""
    tau_mode: Literal["log_e", "median"] = "log_e"
    """log_e: tau = tau0 / log E; median: median of 1 - (u_i.u_j)^2 over i != j, / log E (§5)."""
    coactive_top_m: int | None = None
    """Co-active neighbours per expert: the m largest off-diagonal C entries (§3); None = top-k."""
    coactive_min_frac: float = 0.1
    """Also co-active when C_ji >= min_frac * C_jj (§3)."""
    power_iters: int = 2
    """Warm-started power-iteration steps per prototype refresh (§4)."""
    ortho_coeff: float = 1e-3
    """Expert orthogonality loss weight beta_o (§9, Guo et al.)."""
    ortho_normalize: bool = True
    """Scale-free orthogonality loss (squared cosine of each selected pair, in [0, k-1]) instead
    of the method's squared projection norm, which grows with the square of the expert outputs'
    norm: on the demo model after SFT it is ~1.7e3, so at ortho_coeff=1e-3 it outweighs the RL
    policy loss (~1e-3) by ~400x and its gradient swamps the policy gradient under clipping.
    false = the method's form (§9; docs/algorithm.md, "Departures")."""
    variance_coeff: float = 1e-3
    """Routing-variance loss weight gamma_v (§9, Guo et al.)."""
    clip: bool = False
    """Clip the importance ratio as GRPO does (ablation; §2 default off)."""
    pg_estimator: Literal["ratio", "logprob"] = "ratio"
    """Surrogate fed to the transport: importance ratio (default) or log-prob (§2)."""
    max_updates_per_rollout: int = 4
    """Learner steps on one rollout batch before a forced refresh (§12)."""
    transform_chunk_elems: int | None = None
    """Size (elements) of each of the transform's workspaces: the [E, P] expert-gradient matrix is
    transformed in column chunks of transform_chunk_elems / E (rounded to whole rows of W2 for the
    output projection), which bounds the memory of the attraction and its EP reduce-scatter
    (implementation choice, not the method's). null = 1 << 20 on the CPU (4 MiB fp32: a chunk's
    output stays cached until it is copied back; fastest in benchmarks/bench_step.py,
    docs/benchmarks.md) and 1 << 26 on accelerators (256 MiB fp32: few kernel launches)."""
    trust_region: TrustRegionConfig = field(default_factory=TrustRegionConfig)
    """§10."""
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    """§11."""

    def top_m(self, topk: int) -> int:
        """Resolved coactive_top_m."""
        return topk if self.coactive_top_m is None else self.coactive_top_m


@dataclass
class Config:
    """The whole run. Sections for the trainer (rollout, algorithm, vp2o, logging, checkpoint) are
    added by the issues that build them; unknown sections are rejected like unknown keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    algorithm: Literal["grpo", "vp2o"] = "grpo"
    """grpo: clipped GRPO baseline (method §1); vp2o: Stein transport + trust regions (§2-§12)."""
    vp2o: VP2OConfig = field(default_factory=VP2OConfig)
    """VP2O choices; read only when algorithm = vp2o."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Policy loss options (GRPO; VP2O reads the aggregation and KL options)."""
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

    def validate(self, world_size: int | None = None) -> Config:
        """Check internal consistency and, given ``world_size``, the parallel layout.

        Raises:
            ConfigError: naming the key, the value and what was expected.
        """
        m, p = self.model, self.parallel
        _check(m.num_layers >= 1, "model.num_layers", m.num_layers, "an integer >= 1")
        for key in ("num_attention_heads", "hidden_size", "ffn_hidden_size",
                    "moe_ffn_hidden_size", "vocab_size"):
            _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "an integer >= 1")
        if m.num_query_groups is not None:
            _check(m.num_query_groups >= 1, "model.num_query_groups", m.num_query_groups,
                   "an integer >= 1 (or null for multi-head attention)")
        _check(m.num_experts >= 2, "model.num_experts", m.num_experts, "an integer >= 2")
        _check(
            1 <= m.moe_router_topk <= m.num_experts,
            "model.moe_router_topk",
            m.moe_router_topk,
            f"1 <= top-k <= model.num_experts ({m.num_experts})",
        )
        _check(
            m.hidden_size % m.num_attention_heads == 0 or m.kv_channels is not None,
            "model.hidden_size",
            m.hidden_size,
            f"divisible by model.num_attention_heads ({m.num_attention_heads}), "
            "or set model.kv_channels",
        )
        if m.num_query_groups is not None:
            _check(
                m.num_attention_heads % m.num_query_groups == 0,
                "model.num_query_groups",
                m.num_query_groups,
                f"a divisor of model.num_attention_heads ({m.num_attention_heads})",
            )
        if isinstance(m.moe_layer_freq, list):
            _check(
                len(m.moe_layer_freq) == m.num_layers and set(m.moe_layer_freq) <= {0, 1},
                "model.moe_layer_freq",
                m.moe_layer_freq,
                f"a list of {m.num_layers} zeros and ones (one per layer)",
            )
        else:
            _check(m.moe_layer_freq >= 1, "model.moe_layer_freq", m.moe_layer_freq, ">= 1")
        _check(
            m.num_moe_layers >= 1,
            "model.moe_layer_freq",
            m.moe_layer_freq,
            "at least one MoE layer",
        )
        if m.qk_layernorm_scope == "full":
            _check(
                m.qk_layernorm,
                "model.qk_layernorm",
                m.qk_layernorm,
                "true with model.qk_layernorm_scope=full (the scope of a q/k norm that is off)",
            )
            _check(
                m.normalization == "RMSNorm",
                "model.normalization",
                m.normalization,
                "RMSNorm with model.qk_layernorm_scope=full (only a full-width RMSNorm exists)",
            )
        if m.moe_router_score_function == "sigmoid":
            _check(
                not m.moe_router_pre_softmax,
                "model.moe_router_pre_softmax",
                True,
                "false with moe_router_score_function=sigmoid",
            )
        if m.moe_aux_loss_coeff > 0:
            _check(
                m.moe_router_load_balancing_type != "none",
                "model.moe_router_load_balancing_type",
                "none",
                "aux_loss, seq_aux_loss or global_aux_loss when model.moe_aux_loss_coeff > 0",
            )

        r = self.rollout
        _check(
            r.group_size >= 2,
            "rollout.group_size",
            r.group_size,
            ">= 2: GRPO needs at least 2 samples per prompt",
        )
        _check(r.prompts_per_step >= 1, "rollout.prompts_per_step", r.prompts_per_step, ">= 1")
        _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, ">= 1")
        _check(r.temperature >= 0, "rollout.temperature", r.temperature, ">= 0")
        _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "in (0, 1]")
        _check(r.micro_batch_size >= 1, "rollout.micro_batch_size", r.micro_batch_size, ">= 1")
        _check(
            self.grpo.updates_per_rollout >= 1,
            "grpo.updates_per_rollout",
            self.grpo.updates_per_rollout,
            ">= 1",
        )
        if self.grpo.router_replay:
            _check(
                m.moe_enable_routing_replay,
                "model.moe_enable_routing_replay",
                False,
                "true when grpo.router_replay is on (routers are built with RouterReplay)",
            )
        d = self.data
        if d.task == "jsonl":
            _check(d.train_path is not None, "data.train_path", None,
                   "a JSONL file when data.task=jsonl")
            _check(d.eval_path is not None, "data.eval_path", None,
                   "a JSONL file of held-out rows when data.task=jsonl (vp2o sft, train and eval "
                   "score them)")
        else:  # the built-in task generates its rows: a given file would be ignored
            for key in ("train_path", "eval_path"):
                _check(getattr(d, key) is None, f"data.{key}", getattr(d, key),
                       "null with the built-in task (set data.task=jsonl to read files)")
        _check(d.num_eval_prompts >= 1, "data.num_eval_prompts", d.num_eval_prompts, ">= 1")
        _check(d.num_train_prompts >= 1, "data.num_train_prompts", d.num_train_prompts, ">= 1")
        _check(self.train.steps >= 1, "train.steps", self.train.steps, ">= 1")
        _check(self.train.keep_last >= 1, "train.keep_last", self.train.keep_last,
               ">= 1 (checkpoints kept in train.run_dir/checkpoints)")
        _check(self.reward.workers >= 0, "reward.workers", self.reward.workers,
               ">= 0 (0 scores in the trainer's process)")
        _check(self.reward.timeout_s > 0, "reward.timeout_s", self.reward.timeout_s, "> 0")
        self._check_registered_names()
        self._check_optimizer()
        self._check_loop_ranges()
        if self.optimizer.name == "sgd":
            _check(
                not p.use_distributed_optimizer,
                "parallel.use_distributed_optimizer",
                True,
                "false with optimizer.name=sgd (megatron's DistributedOptimizer is Adam-only)",
            )
        _check(
            not p.overlap_param_gather,
            "parallel.overlap_param_gather",
            True,
            "false (the RL loop reads the updated weights outside a forward right after the "
            "optimizer step: prototype refresh, checkpoints, rollback; with the overlap they are "
            "stale outside each rank's shard until the next forward)",
        )
        for key in ("tensor_parallel", "pipeline_parallel", "context_parallel", "expert_parallel"):
            value = getattr(p, key)
            _check(value >= 1, f"parallel.{key}", value, "an integer >= 1")
        _check(
            p.expert_tensor_parallel is None or p.expert_tensor_parallel >= 1,
            "parallel.expert_tensor_parallel",
            p.expert_tensor_parallel,
            "an integer >= 1, or null for parallel.tensor_parallel",
        )
        tp = p.tensor_parallel
        _check(
            m.num_attention_heads % tp == 0,
            "model.num_attention_heads",
            m.num_attention_heads,
            f"divisible by parallel.tensor_parallel ({tp})",
        )
        if m.num_query_groups is not None:
            _check(
                m.num_query_groups % tp == 0,
                "model.num_query_groups",
                m.num_query_groups,
                f"divisible by parallel.tensor_parallel ({tp})",
            )
        if m.qk_layernorm_scope == "full":
            _check(
                tp == 1,
                "parallel.tensor_parallel",
                tp,
                "1 with model.qk_layernorm_scope=full (the full-width q/k norm spans all heads; "
                "a tensor-parallel rank holds only some of them)",
            )
        _check(
            m.ffn_hidden_size % tp == 0,
            "model.ffn_hidden_size",
            m.ffn_hidden_size,
            f"divisible by parallel.tensor_parallel ({tp})",
        )
        _check(
            m.moe_ffn_hidden_size % p.etp == 0,
            "model.moe_ffn_hidden_size",
            m.moe_ffn_hidden_size,
            f"divisible by the expert tensor-parallel size ({p.etp})",
        )
        _check(
            m.num_experts % p.expert_parallel == 0,
            "model.num_experts",
            m.num_experts,
            f"divisible by parallel.expert_parallel ({p.expert_parallel})",
        )
        _check(
            m.num_layers % p.pipeline_parallel == 0,
            "model.num_layers",
            m.num_layers,
            f"divisible by parallel.pipeline_parallel ({p.pipeline_parallel})",
        )
        if tp > 1:
            _check(
                p.sequence_parallel,
                "parallel.sequence_parallel",
                p.sequence_parallel,
                f"true: megatron-core MoE with tensor_parallel={tp} > 1 needs sequence parallelism",
            )
        if self.algorithm == "vp2o":
            v = self.vp2o
            _check(v.alpha >= 0, "vp2o.alpha", v.alpha, ">= 0")
            _check(v.tau0 > 0, "vp2o.tau0", v.tau0, "> 0")
            _check(v.power_iters >= 1, "vp2o.power_iters", v.power_iters, ">= 1")
            _check(v.top_m(m.moe_router_topk) >= 0, "vp2o.coactive_top_m", v.coactive_top_m, ">= 0")
            _check(v.coactive_min_frac >= 0, "vp2o.coactive_min_frac", v.coactive_min_frac,
                   ">= 0 (> 1 keeps only the top-m neighbours)")
            for key in ("ortho_coeff", "variance_coeff"):
                _check(getattr(v, key) >= 0, f"vp2o.{key}", getattr(v, key), ">= 0 (0 = off)")
            tr, b = v.trust_region, v.behavior
            _check(tr.delta >= 0, "vp2o.trust_region.delta", tr.delta,
                   ">= 0 (the anchor budget; 0 rejects every step that moves the routing)")
            _check(b.lam >= 0, "vp2o.behavior.lam", b.lam, ">= 0")
            _check(b.eps_drift >= 0, "vp2o.behavior.eps_drift", b.eps_drift, ">= 0")
            _check(0 <= b.ess_min <= 1, "vp2o.behavior.ess_min", b.ess_min,
                   "in [0, 1] (a normalised effective sample size)")
            _check(
                v.max_updates_per_rollout >= 1,
                "vp2o.max_updates_per_rollout",
                v.max_updates_per_rollout,
                ">= 1",
            )
            _check(
                v.transform_chunk_elems is None or v.transform_chunk_elems >= 1,
                "vp2o.transform_chunk_elems",
                v.transform_chunk_elems,
                ">= 1 (or null: by device)",
            )
            _check(
                p.etp == 1,
                "parallel.expert_tensor_parallel",
                p.etp,
                "1 with algorithm=vp2o (the repulsion differentiates a power iteration through "
                "whole expert weights; megatron also recommends ETP=1 for MoE)",
            )
            _check(
                not p.overlap_grad_reduce,
                "parallel.overlap_grad_reduce",
                True,
                "false with algorithm=vp2o: the Stein transform mixes expert gradients before "
                "they are reduced, so the reduction cannot start during backward",
            )
            if v.ortho_coeff > 0:
                # The orthogonality loss reads each token's k expert outputs before megatron sums
                # them (VP2OMoELayer.postprocess): only the alltoall dispatcher hands them over
                # there; allgather (any EP x TP) sums them inside its combine_preprocess.
                _check(
                    m.moe_token_dispatcher_type == "alltoall",
                    "model.moe_token_dispatcher_type",
                    m.moe_token_dispatcher_type,
                    "alltoall when algorithm=vp2o and vp2o.ortho_coeff > 0 (the orthogonality "
                    "loss needs each token's expert outputs before they are summed; or set "
                    "vp2o.ortho_coeff=0)",
                )
        if world_size is not None:
            _check(
                world_size % p.model_parallel_size == 0,
                "parallel",
                f"TP={tp} x PP={p.pipeline_parallel} x CP={p.context_parallel}",
                f"a product that divides the world size ({world_size})",
            )
            per_stage = world_size // p.pipeline_parallel
            _check(
                per_stage % (p.etp * p.expert_parallel) == 0,
                "parallel.expert_parallel",
                p.expert_parallel,
                f"EP x ETP ({p.expert_parallel} x {p.etp}) dividing world size / PP "
                f"({world_size} / {p.pipeline_parallel} = {per_stage})",
            )
        return self

    def _check_loop_ranges(self) -> None:
        """Values the loops would otherwise reject (or misread) only at their first step."""
        m, r, g, t, sft = self.model, self.rollout, self.grpo, self.train, self.sft
        _check(t.max_consecutive_skips >= 1, "train.max_consecutive_skips",
               t.max_consecutive_skips, ">= 1")
        _check(sft.steps >= 1, "sft.steps", sft.steps, ">= 1")
        _check(sft.batch_size >= 1, "sft.batch_size", sft.batch_size, ">= 1")
        _check(r.top_k >= 0, "rollout.top_k", r.top_k, ">= 0 (0 = off)")
        _check(all(r.stop_strings), "rollout.stop_strings", r.stop_strings,
               "non-empty strings (an empty one would stop every sequence at once)")
        _check(g.kl_coeff >= 0, "grpo.kl_coeff", g.kl_coeff, ">= 0 (0 = no KL penalty)")
        _check(g.clip_ratio_c is None or g.clip_ratio_c > 1, "grpo.clip_ratio_c",
               g.clip_ratio_c, "null or > 1 (the dual-clip bound)")
        _check(0 <= g.clip_low < 1, "grpo.clip_low", g.clip_low, "in [0, 1)")
        _check(g.clip_high >= 0, "grpo.clip_high", g.clip_high, ">= 0")
        if self.algorithm == "vp2o" and self.vp2o.pg_estimator == "logprob":
            _check(not self.vp2o.clip, "vp2o.clip", True,
                   "false with vp2o.pg_estimator=logprob (there is no ratio to clip)")
            _check(g.clip_ratio_c is None, "grpo.clip_ratio_c", g.clip_ratio_c,
                   "null with vp2o.pg_estimator=logprob (there is no ratio to clip)")
        if m.position_embedding_type == "learned_absolute":
            longest = self.data.max_prompt_tokens + r.max_new_tokens
            _check(longest <= m.max_position_embeddings, "model.max_position_embeddings",
                   m.max_position_embeddings,
                   f">= data.max_prompt_tokens + rollout.max_new_tokens ({longest}) with "
                   "learned absolute positions")
        if m.moe_shared_expert_gate:  # megatron would ignore the gate without a shared expert
            _check(bool(m.moe_shared_expert_intermediate_size),
                   "model.moe_shared_expert_intermediate_size",
                   m.moe_shared_expert_intermediate_size,
                   "> 0 with model.moe_shared_expert_gate=true (there is no shared expert to gate)")
        if m.moe_router_topk == 1 and m.moe_router_score_function == "softmax":
            _check(m.moe_router_pre_softmax, "model.moe_router_pre_softmax", False,
                   "true when model.moe_router_topk = 1 with softmax scores (megatron-core)")
        if self.data.task == "arith":
            from vp2o.data.tasks import ARITH_PROMPTS

            wanted = self.data.num_train_prompts + self.data.num_eval_prompts
            _check(wanted <= ARITH_PROMPTS, "data.num_train_prompts", self.data.num_train_prompts,
                   f"at most {ARITH_PROMPTS} - data.num_eval_prompts: the built-in task has "
                   f"{ARITH_PROMPTS} distinct prompts")

    def _check_optimizer(self) -> None:
        """Ranges of the optimizer settings (a NaN or negative lr used to train on)."""
        import math

        o = self.optimizer
        _check(math.isfinite(o.lr) and o.lr > 0, "optimizer.lr", o.lr, "a finite number > 0")
        _check(math.isfinite(o.min_lr) and 0 <= o.min_lr <= o.lr, "optimizer.min_lr", o.min_lr,
               f"in [0, optimizer.lr = {o.lr}]")
        _check(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay",
               o.weight_decay, "a finite number >= 0")
        for key in ("adam_beta1", "adam_beta2", "sgd_momentum"):
            value = getattr(o, key)
            _check(0 <= value < 1, f"optimizer.{key}", value, "in [0, 1)")
        _check(o.adam_eps > 0, "optimizer.adam_eps", o.adam_eps, "> 0")
        _check(math.isfinite(o.clip_grad) and o.clip_grad >= 0, "optimizer.clip_grad",
               o.clip_grad, "a finite number >= 0 (0 = no clipping)")
        _check(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, ">= 0")

    def _check_registered_names(self) -> None:
        """Names looked up in registries at run time, checked at load (a typo would otherwise
        surface after the model is built, or in the first training step)."""
        from vp2o.algo.grpo import AGGREGATIONS, KL_ESTIMATORS
        from vp2o.rewards.registry import available

        for key, registry in (("aggregation", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS)):
            value = getattr(self.grpo, key)
            _check(value in registry, f"grpo.{key}", value,
                   f"one of {', '.join(registry.names())}")
        name = self.reward.name
        _check(name in available() or "." in name or ":" in name, "reward.name", name,
               f"one of {', '.join(available())}, or a dotted path 'pkg.module:fn'")

    def check_loop_settings(self, *, generates: bool = False, rl: bool = False) -> Config:
        """Refuse settings that vp2o's loops cannot run correctly (call before any process group
        exists, so they fail at once, not after the model is built and loaded).

        Every loop: context parallelism (megatron-core expects the caller to hand each CP rank
        its own slices of every sequence and to combine the per-token losses across the CP
        group; vp2o's loops hand every rank whole sequences, and under transformer-engine
        attention CP > 1 would train on wrong attention without an error), and fp16 parameters
        (vp2o sets no loss scale, so megatron's fp16 optimizer divides the gradients by a
        dynamic scale that starts at 2^32: nothing is learned). ``generates`` (``vp2o train``,
        ``vp2o eval``): the rollout loop runs TP = PP = 1 (docs/rollout.md). ``rl``
        (``vp2o train``): no dropout (behaviour log-probs are recorded in eval mode, the
        learner's in train mode: dropout alone would make every step off-policy) and a sampling
        temperature > 0 (greedy samples of a group are identical: every advantage is 0).
        ``Config.validate`` accepts all of these: ``vp2o launch`` plans any layout megatron
        accepts and ``vp2o convert`` writes fp16 (docs/scaling.md).

        Raises:
            ConfigError: naming the key, its value and what was expected.
        """
        p, m = self.parallel, self.model
        _check(
            p.context_parallel == 1,
            "parallel.context_parallel",
            p.context_parallel,
            "1 for vp2o sft/train/eval (the loops give every rank whole sequences; splitting "
            "them over context-parallel ranks is not implemented, docs/scaling.md)",
        )
        _check(
            m.params_dtype != "fp16",
            "model.params_dtype",
            m.params_dtype,
            "fp32 or bf16 for vp2o sft/train/eval (fp16 needs a loss scale, which vp2o does not "
            "set: the updates would be ~0)",
        )
        if generates:
            _check(
                self.train.eval_samples == 1 or self.rollout.temperature > 0,
                "rollout.temperature",
                self.rollout.temperature,
                f"> 0 with train.eval_samples = {self.train.eval_samples} (greedy samples of a "
                "prompt are identical: pass@k would be pass@1)",
            )
            for key in ("tensor_parallel", "pipeline_parallel"):
                _check(
                    getattr(p, key) == 1,
                    f"parallel.{key}",
                    getattr(p, key),
                    "1 for vp2o train/eval (their rollout generation runs TP = PP = 1, "
                    "docs/rollout.md)",
                )
        if rl:
            for key in ("hidden_dropout", "attention_dropout"):
                _check(
                    getattr(m, key) == 0,
                    f"model.{key}",
                    getattr(m, key),
                    "0 for vp2o train (rollouts are sampled without dropout and the learner "
                    "would apply it: every step would be off-policy)",
                )
            _check(
                self.rollout.temperature > 0,
                "rollout.temperature",
                self.rollout.temperature,
                "> 0 for vp2o train (greedy samples of a group are identical, so every "
                "advantage is 0)",
            )
        return self


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last
    one silently: a config edited in two places would run with whichever came last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    world_size: int | None = None,
) -> Config:
    """Load a :class:`Config` from YAML (or defaults), apply dotted overrides, and validate.

    Args:
        path: YAML file; None starts from the defaults.
        overrides: dotted assignments, values parsed as YAML (``model.num_experts=16``,
            ``model.moe_layer_freq=[1,0,1,0]``).
        world_size: if given, the parallel layout is checked against it too.

    Raises:
        ConfigError: malformed YAML (with the file and line), unknown keys, wrong types, or an
            inconsistent layout.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not valid UTF-8 text ({e.reason})") from None
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.strip(), value)
    cfg = from_dict(Config, raw)
    return cfg.validate(world_size)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type.

    Raises:
        ConfigError: an unknown key (with the known ones) or a value of the wrong type.
    """
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; expected one of: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(map(repr, args))}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        (item_tp,) = args or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = []
    for a in args:
        if typing.get_origin(a) is list:
            names.append("a list")
        elif typing.get_origin(a) is Literal:
            names.append("one of " + ", ".join(map(repr, typing.get_args(a))))
        else:
            names.append(getattr(a, "__name__", str(a)))
    if type(None) in typing.get_args(tp):
        names.append("null")
    return " or ".join(names)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for logging, wandb and checkpoints)."""
    return dataclasses.asdict(cfg)
