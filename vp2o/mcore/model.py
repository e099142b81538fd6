"""Build a megatron-core ``GPTModel`` with MoE layers from :class:`vp2o.config.ModelConfig`.

Qwen3-MoE, Qwen2-MoE (shared experts, QKV bias), Mixtral and OLMoE are expressible; OLMoE's
q/k RMSNorm over the whole projection (``model.qk_layernorm_scope = "full"``) replaces megatron's
per-head q/k norm in the layer spec with ``vp2o.mcore.qk_norm`` (TP = 1 only);
``model.core_attention = "sdpa"`` replaces the local spec's core attention with
``vp2o.mcore.sdpa_attention``. The local (pure PyTorch) spec runs on CPU; the
transformer-engine spec is used when TE imports and CUDA is present (``model.transformer_impl``).
Extension slot: ``layer_spec_hook`` receives each decoder layer's ``ModuleSpec`` and may return
a modified one (the VP2O MoE layer installs its router subclass this way), so megatron-core files
are never edited.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from vp2o.config import Config, ConfigError, ModelConfig, ParallelConfig
from vp2o.dtypes import DTYPES
from vp2o.mcore.qk_norm import install_full_width_qk_norm

LayerSpecHook = Callable[[object, int], object]  # (ModuleSpec, 1-based layer number) -> ModuleSpec


def use_transformer_engine(m: ModelConfig) -> bool:
    """Whether to build with transformer-engine modules."""
    if m.transformer_impl == "local":
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        if m.transformer_impl == "transformer_engine":
            raise RuntimeError(
                "model.transformer_impl=transformer_engine but transformer-engine does not import; "
                "install vp2o[te] on a CUDA machine or set model.transformer_impl=local"
            ) from None
        return False
    return torch.cuda.is_available()


def use_grouped_experts(m: ModelConfig) -> bool:
    """Whether MoE layers get vp2o's ``GroupedExperts`` (vp2o/mcore/grouped_experts.py).

    ``model.moe_grouped_gemm = true`` runs all local experts in one grouped GEMM: with the
    transformer-engine spec megatron's ``TEGroupedMLP``, with the local spec vp2o's
    ``GroupedExperts`` (``torch._grouped_mm``, CPU and CUDA; megatron's own local choice, the
    legacy ``GroupedMLP``, needs the ``grouped_gemm`` package). False: ``SequentialMLP``.
    """
    return m.moe_grouped_gemm and not use_transformer_engine(m)


def transformer_config(cfg: Config):
    """Translate our config into megatron-core's ``TransformerConfig`` (the one place)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m: ModelConfig = cfg.model
    p: ParallelConfig = cfg.parallel
    dtype = DTYPES[m.params_dtype]
    recompute = {}
    if m.recompute == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=m.recompute_num_layers,
        )
    elif m.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    moe_layer_freq = (
        m.moe_layer_freq if isinstance(m.moe_layer_freq, int) else list(m.moe_layer_freq)
    )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        gated_linear_unit=m.gated_linear_unit,
        activation_func=F.silu if m.activation == "silu" else F.gelu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        init_method_std=m.init_method_std,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        rotary_interleaved=False,
        # MoE
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_layer_freq=moe_layer_freq,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=m.moe_shared_expert_gate,
        moe_grouped_gemm=m.moe_grouped_gemm and not use_grouped_experts(m),
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_router_load_balancing_type=m.moe_router_load_balancing_type,
        moe_router_dtype=m.moe_router_dtype,
        moe_enable_routing_replay=m.moe_enable_routing_replay,
        moe_permute_fusion=False,
        # numerics
        params_dtype=dtype,
        bf16=m.params_dtype == "bf16",
        fp16=m.params_dtype == "fp16",
        pipeline_dtype=dtype,
        # parallel
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        context_parallel_size=p.context_parallel,
        expert_model_parallel_size=p.expert_parallel,
        expert_tensor_parallel_size=p.etp,
        sequence_parallel=p.sequence_parallel,
        **recompute,
    )


def check_sequence_parallel_norms(cfg: Config) -> None:
    """Refuse sequence parallelism where megatron would build its torch norms.

    megatron-core needs sequence parallelism for MoE with tensor parallelism > 1 (its MoE layer
    raises in training otherwise; ``Config.validate`` requires it), and its pure-PyTorch norms
    (the local spec: no transformer-engine, no apex) assert that sequence parallelism is off.
    So TP > 1 builds only with transformer-engine, i.e. on CUDA: say so by field name, before
    megatron's bare assertion.
    """
    if cfg.parallel.sequence_parallel and not use_transformer_engine(cfg.model):
        raise ConfigError(
            "parallel.sequence_parallel = true (needed by MoE with parallel.tensor_parallel = "
            f"{cfg.parallel.tensor_parallel}) requires transformer-engine norms: megatron-core's "
            "torch norms refuse sequence parallelism; install vp2o[te] on a CUDA machine "
            "(model.transformer_impl = auto or transformer_engine), or use "
            "parallel.tensor_parallel = 1 with expert/data parallelism"
        )


def decoder_block_spec(cfg: Config, tconfig, layer_spec_hook: LayerSpecHook | None = None):
    """megatron's GPT decoder block spec for ``cfg``, each layer passed through the hook."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(
        tconfig,
        use_transformer_engine=use_transformer_engine(cfg.model),
        normalization=cfg.model.normalization,
    )
    if cfg.model.qk_layernorm and cfg.model.qk_layernorm_scope == "full":
        # OLMoE: one RMS statistic over all heads instead of megatron's per-head q/k norm.
        # Edit copies, as for the hook: megatron's spec helpers may share spec objects.
        block.layer_specs = [
            install_full_width_qk_norm(copy.deepcopy(spec)) for spec in block.layer_specs
        ]
    if cfg.model.core_attention == "sdpa":
        from vp2o.mcore.sdpa_attention import install_sdpa_attention

        if use_transformer_engine(cfg.model):
            raise ConfigError(
                "model.core_attention = 'sdpa': expected model.transformer_impl = local here "
                f"(model.transformer_impl = {cfg.model.transformer_impl!r} builds the "
                "transformer-engine spec, whose attention is already fused)")
        block.layer_specs = [
            install_sdpa_attention(copy.deepcopy(spec)) for spec in block.layer_specs
        ]
    if use_grouped_experts(cfg.model):
        from vp2o.mcore.grouped_experts import GroupedExperts

        block.layer_specs = [copy.deepcopy(spec) for spec in block.layer_specs]
        for spec in block.layer_specs:
            experts = getattr(getattr(spec.submodules.mlp, "submodules", None), "experts", None)
            if experts is not None:
                experts.module = GroupedExperts
    if layer_spec_hook is not None:
        # Specs are shared objects inside megatron's spec helpers: deep-copy before editing.
        block.layer_specs = [
            layer_spec_hook(copy.deepcopy(spec), i + 1) for i, spec in enumerate(block.layer_specs)
        ]
    return block


def padded_vocab_size(cfg: Config) -> int:
    """Vocabulary padded to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor_parallel
    return -(-cfg.model.vocab_size // multiple) * multiple


def build_model(cfg: Config, *, layer_spec_hook: LayerSpecHook | None = None):
    """Build the ``GPTModel`` for this rank (after ``vp2o.mcore.parallel.initialize``).

    Expert parameters are marked ``allreduce=False`` even at EP=1, so megatron keeps them in its
    expert grad buffers and expert optimizer at every EP size: the Stein transform and the
    checkpoint layout are then identical across layouts (docs/design.md, "Expert
    parameters at every EP size").
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from vp2o.mcore import cpu

    check_sequence_parallel_norms(cfg)
    tconfig = transformer_config(cfg)
    m = cfg.model
    with cpu.cuda_as_cpu(), _quiet_subclassed_mlp_warning(layer_spec_hook is not None):
        model = GPTModel(
            config=tconfig,
            transformer_layer_spec=decoder_block_spec(cfg, tconfig, layer_spec_hook),
            vocab_size=padded_vocab_size(cfg),
            max_sequence_length=m.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type,
            rotary_percent=m.rotary_percent,
            rotary_base=m.rotary_base,
        )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    for name, param in model.named_parameters():
        if is_expert_param(name):
            param.allreduce = False
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.register_forward_hook(drop_dispatcher_probs)
    return model


def drop_dispatcher_probs(layer: torch.nn.Module, args, output) -> None:
    """Forward hook on every MoE layer (installed by :func:`build_model`): forget the routing
    probabilities megatron's token dispatcher stashes for the layer's own forward.

    Kept after the forward (``MoEAlltoAllTokenDispatcher.probs``, nothing reads it before the
    next forward sets it again), that tensor's graph reaches the router weight's gradient
    accumulator (C++), which holds megatron DDP's hook, which holds the DDP wrapper, hence the
    model and the dispatcher: a reference cycle Python's collector cannot see. A model dropped
    after a backward would then stay, with its DDP buffers and every process group megatron made
    (each gloo group keeps a polling thread), until the process exits (docs/design.md,
    "Releasing a model").
    """
    dispatcher = getattr(layer, "token_dispatcher", None)
    if getattr(dispatcher, "probs", None) is not None:
        dispatcher.probs = None


@contextlib.contextmanager
def _quiet_subclassed_mlp_warning(active: bool) -> Iterator[None]:
    """Drop megatron's "Unknown MLP type" warning while building hooked specs.

    TransformerLayer recognises ``MoELayer`` by identity (``module in (MoELayer, ...)``) to pass
    it ``pg_collection``; a subclass gets no kwargs, and MoELayer then takes the default process
    group collection, which is the one TransformerLayer would have passed. The warning is
    therefore noise for our subclasses; nothing else is filtered.
    """
    if not active:
        yield
        return
    log = logging.getLogger("megatron.core.transformer.transformer_layer")
    drop = logging.Filter()
    drop.filter = lambda record: not str(record.getMessage()).startswith("Unknown MLP type")
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def is_expert_param(name: str) -> bool:
    """Routed-expert parameter (not the router, not shared experts)."""
    return ".mlp.experts." in name


def global_param_name(name: str, *, ep_rank: int, num_local_experts: int) -> str:
    """Rename ``...experts.local_experts.{i}...`` to the global expert id ``ep_rank * E_local + i``.

    Global expert id = ``ep_rank * (E / EP) + i`` (megatron's MoELayer), so names from runs with
    different EP sizes can be compared and checkpoints re-mapped.
    """
    marker = ".mlp.experts.local_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker, 1)
    local, _, rest = tail.partition(".")
    return f"{head}{marker}{ep_rank * num_local_experts + int(local)}.{rest}"
