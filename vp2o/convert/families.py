"""Model families: HF config <-> :class:`vp2o.config.ModelConfig`, and HF <-> megatron tensor names.

A :class:`Family` knows one Hugging Face architecture: how to read its ``config.json`` into our
``ModelConfig`` (raising :class:`ConvertError` naming the field when the builder cannot express
it), how to write a ``config.json`` back, and which HF tensors make each megatron parameter
(:meth:`Family.rules`). Families are registered by name; lookup is by ``architectures[0]`` (or
``model_type``) of the HF config.

Supported: Qwen3-MoE, Qwen2-MoE (shared expert with a sigmoid gate, QKV bias), Mixtral, OLMoE.
OLMoE's q/k RMSNorm spans the whole projection (one statistic over all heads), not each head as
megatron's ``qk_layernorm`` does: it reads as ``qk_layernorm_scope="full"``, which the builder
implements with ``vp2o.mcore.qk_norm`` (its weights keep the ``{q,k}_layernorm.weight`` names,
at widths ``[H h]`` / ``[G h]`` instead of ``[h]``).

Routing equivalences (verified by the logits tests): HF ``norm_topk_prob=True`` (and Mixtral,
always) = softmax over the top-k logits = megatron ``moe_router_pre_softmax=False``;
``norm_topk_prob=False`` = softmax over all experts, then top-k, no renormalisation =
``moe_router_pre_softmax=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vp2o.config import ModelConfig
from vp2o.convert.tensors import ConvertError, LayoutGeometry, TensorRule
from vp2o.registry import Registry

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Family:
    """One HF MoE architecture and its mapping onto megatron-core."""

    name: str
    """Registry name (the HF ``model_type``)."""
    architecture: str
    """HF ``architectures[0]``."""
    read: Callable[[Any], dict[str, Any]]
    """HF config object -> ``ModelConfig`` keyword arguments; raises ConvertError on fields the
    builder cannot express."""
    write: Callable[[ModelConfig], dict[str, Any]]
    """``ModelConfig`` -> HF ``config.json`` dict, in the keys released checkpoints use."""
    moe_block: str = "mlp"
    """HF submodule of a decoder layer holding router and experts."""
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """HF names of an expert's (gate, up, down) projections."""

    def model_config(self, hf_config: Any, *, params_dtype: str = "fp32") -> ModelConfig:
        """Our ``ModelConfig`` for an HF config object (``transformers.PretrainedConfig``).

        Raises:
            ConvertError: a field the builder cannot express, named.
        """
        kwargs = self.read(hf_config)
        return ModelConfig(**kwargs, params_dtype=params_dtype)

    def hf_config(self, m: ModelConfig) -> dict[str, Any]:
        """The HF ``config.json`` dict for ``m``, checked to read back as the same architecture.

        Raises:
            ConvertError: a ``model.*`` field this family cannot express, named.
        """
        out = self.write(m)
        back = self.model_config(load_hf_config(out), params_dtype=m.params_dtype)
        diffs = arch_differences(m, back)
        if diffs:
            field, ours, theirs = diffs[0]
            raise ConvertError(
                f"model.{field} = {ours!r} cannot be expressed as a {self.name} HF config "
                f"(it would read back as {theirs!r})"
            )
        return out

    def rules(self, m: ModelConfig) -> list[TensorRule]:
        """Every megatron parameter (TP = EP = PP = 1 names) and the HF tensors it is made of."""
        rules = [
            TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
        ]
        gate, up, down = self.expert_proj
        for i, is_moe in enumerate(m.moe_layer_pattern):
            hf, mc = f"model.layers.{i}", f"decoder.layers.{i}"
            attn = f"{hf}.self_attn"
            rules += [
                TensorRule(
                    f"{mc}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",), "copy"
                ),
                TensorRule(
                    f"{mc}.self_attention.linear_qkv.weight",
                    tuple(f"{attn}.{p}_proj.weight" for p in "qkv"),
                    "qkv",
                ),
            ]
            if m.add_qkv_bias:
                rules.append(
                    TensorRule(
                        f"{mc}.self_attention.linear_qkv.bias",
                        tuple(f"{attn}.{p}_proj.bias" for p in "qkv"),
                        "qkv",
                    )
                )
            if m.qk_layernorm:
                rules += [
                    TensorRule(
                        f"{mc}.self_attention.{p}_layernorm.weight",
                        (f"{attn}.{p}_norm.weight",),
                        "copy",
                    )
                    for p in "qk"
                ]
            rules += [
                TensorRule(
                    f"{mc}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",), "copy"
                ),
                TensorRule(
                    f"{mc}.pre_mlp_layernorm.weight",
                    (f"{hf}.post_attention_layernorm.weight",),
                    "copy",
                ),
            ]
            if not is_moe:
                mlp = f"{hf}.mlp"
                rules += [
                    TensorRule(
                        f"{mc}.mlp.linear_fc1.weight",
                        (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"),
                        "glu",
                    ),
                    TensorRule(f"{mc}.mlp.linear_fc2.weight", (f"{mlp}.down_proj.weight",), "copy"),
                ]
                continue
            blk = f"{hf}.{self.moe_block}"
            rules.append(TensorRule(f"{mc}.mlp.router.weight", (f"{blk}.gate.weight",), "copy"))
            for e in range(m.num_experts):
                ex, local = f"{blk}.experts.{e}", f"{mc}.mlp.experts.local_experts.{e}"
                rules += [
                    TensorRule(
                        f"{local}.linear_fc1.weight",
                        (f"{ex}.{gate}.weight", f"{ex}.{up}.weight"),
                        "glu",
                    ),
                    TensorRule(f"{local}.linear_fc2.weight", (f"{ex}.{down}.weight",), "copy"),
                ]
            if m.moe_shared_expert_intermediate_size:
                sh = f"{blk}.shared_expert"
                rules += [
                    TensorRule(
                        f"{mc}.mlp.shared_experts.linear_fc1.weight",
                        (f"{sh}.gate_proj.weight", f"{sh}.up_proj.weight"),
                        "glu",
                    ),
                    TensorRule(
                        f"{mc}.mlp.shared_experts.linear_fc2.weight",
                        (f"{sh}.down_proj.weight",),
                        "copy",
                    ),
                ]
                if m.moe_shared_expert_gate:
                    rules.append(
                        TensorRule(
                            f"{mc}.mlp.shared_experts.gate_weight",
                            (f"{blk}.shared_expert_gate.weight",),
                            "copy",
                        )
                    )
        rules.append(TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
        if m.untie_embeddings_and_output_weights:
            rules.append(TensorRule("output_layer.weight", ("lm_head.weight",), "vocab"))
        return rules


def geometry(m: ModelConfig) -> LayoutGeometry:
    """Layout sizes for ``m``."""
    return LayoutGeometry(
        num_heads=m.num_attention_heads,
        num_groups=m.num_query_groups or m.num_attention_heads,
        head_dim=m.head_dim,
        vocab_size=m.vocab_size,
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

FAMILIES: Registry[Family] = Registry("family", error=ConvertError)


def register_family(family: Family) -> Family:
    """Add a family; duplicate names or architectures raise."""
    for other in FAMILIES.values():
        if family.architecture == other.architecture:
            raise ValueError(
                f"architecture {family.architecture} is already registered (family {other.name!r})"
            )
    return FAMILIES.add(family.name, family)


def get_family(name: str) -> Family:
    """The family called ``name`` (an HF ``model_type``); unknown names raise ``ConvertError``."""
    return FAMILIES.get(name)


def family_for(hf_config: dict[str, Any]) -> Family:
    """The family of an HF ``config.json`` dict, by ``architectures[0]``, else ``model_type``."""
    archs = hf_config.get("architectures") or []
    for family in FAMILIES.values():
        if archs and archs[0] == family.architecture:
            return family
    model_type = hf_config.get("model_type")
    if not archs and model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(f"{f.architecture} ({f.name})" for f in FAMILIES.values())
    got = f"architectures = {archs!r}" if archs else f"model_type = {model_type!r}"
    raise ConvertError(f"config.json: unknown architecture: {got}; supported: {supported}")


# --------------------------------------------------------------------------------------------
# Reading HF configs (transformers 4 and 5 attribute names)
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _get(c: Any, name: str, default: Any = _MISSING) -> Any:
    value = getattr(c, name, default)
    if value is _MISSING:
        raise ConvertError(f"config.json: {name} is missing")
    return value


def _rope(c: Any) -> int:
    """RoPE base; only plain RoPE (no scaling, full rotary dimension) is expressible."""
    params = getattr(c, "rope_parameters", None)  # transformers >= 5
    if isinstance(params, dict):
        field = "rope_parameters"
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", getattr(c, "rope_theta", None))
        partial = params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    else:  # transformers 4
        field = "rope_scaling"
        scaling = getattr(c, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        theta = getattr(c, "rope_theta", None)
        partial = getattr(c, "partial_rotary_factor", 1.0)
    if rope_type != "default":
        raise ConvertError(
            f"config.json: {field}.rope_type = {rope_type!r}: only plain RoPE ('default') is "
            "expressible (model.rotary_base has no YaRN/linear/dynamic scaling)"
        )
    if partial not in (None, 1.0, 1):
        raise ConvertError(
            f"config.json: partial_rotary_factor = {partial!r}: only 1.0 is supported"
        )
    if theta is None:
        raise ConvertError("config.json: rope_theta is missing")
    if float(theta) != int(theta):
        raise ConvertError(f"config.json: rope_theta = {theta!r}: model.rotary_base is an integer")
    return int(theta)


def _common(c: Any) -> dict[str, Any]:
    act = _get(c, "hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' "swish" is the same function as "silu"
        raise ConvertError(f"config.json: hidden_act = {act!r}: only 'silu' (SwiGLU) is supported")
    hidden, heads = _get(c, "hidden_size"), _get(c, "num_attention_heads")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return dict(
        num_layers=_get(c, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=getattr(c, "num_key_value_heads", None) or heads,
        kv_channels=None if head_dim * heads == hidden else head_dim,
        vocab_size=_get(c, "vocab_size"),
        max_position_embeddings=_get(c, "max_position_embeddings"),
        position_embedding_type="rope",
        rotary_base=_rope(c),
        rotary_percent=1.0,
        normalization="RMSNorm",
        norm_epsilon=float(_get(c, "rms_norm_eps")),
        gated_linear_unit=True,
        activation="silu",
        add_bias_linear=False,
        untie_embeddings_and_output_weights=not _get(c, "tie_word_embeddings", False),
        init_method_std=float(getattr(c, "initializer_range", 0.02)),
        attention_dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0),
        moe_router_score_function="softmax",
        moe_router_topk_scaling_factor=None,
        moe_aux_loss_coeff=0.0,
    )


def _qwen_layer_freq(c: Any) -> int | list[int]:
    """Qwen's ``decoder_sparse_step`` / ``mlp_only_layers`` as megatron's ``moe_layer_freq``."""
    n = _get(c, "num_hidden_layers")
    step = getattr(c, "decoder_sparse_step", 1) or 1
    dense = set(getattr(c, "mlp_only_layers", None) or [])
    pattern = [0 if i in dense or (i + 1) % step else 1 for i in range(n)]
    if not any(pattern):
        raise ConvertError(
            f"config.json: decoder_sparse_step = {step}, mlp_only_layers = {sorted(dense)}: no "
            f"layer of the {n} is sparse; expected at least one MoE layer"
        )
    return 1 if all(pattern) else pattern


def _pre_softmax(c: Any, renormalised: bool, why: str) -> bool:
    """megatron's ``moe_router_pre_softmax`` for HF's top-k gates: softmax over all experts, then
    top-k, renormalised over the k (``renormalised``: softmax over the top-k logits, the same
    gates) or not. megatron-core refuses a softmax over a single logit, whose gate is always 1
    and gives the router no gradient: a top-1 checkpoint that renormalises cannot be expressed."""
    if renormalised and _get(c, "num_experts_per_tok") == 1:
        raise ConvertError(
            f"config.json: num_experts_per_tok = 1 with {why}: the one expert's gate is always 1.0 "
            "(no router gradient), which megatron-core refuses (it needs the softmax before the "
            "top-1 selection)"
        )
    return not renormalised


def _no_sliding_window(c: Any) -> None:
    if getattr(c, "use_sliding_window", False):
        raise ConvertError(
            "config.json: use_sliding_window = true: sliding-window attention is not supported"
        )


def _no_quantization(c: Any) -> None:
    if getattr(c, "quantization_config", None):
        raise ConvertError(
            "config.json: quantization_config is set: quantized checkpoints are not supported; "
            "convert the bf16 release"
        )


def _read_qwen3(c: Any) -> dict[str, Any]:
    _no_sliding_window(c)
    _no_quantization(c)
    if getattr(c, "attention_bias", False):
        raise ConvertError(
            "config.json: attention_bias = true: Qwen3 then also biases o_proj, which needs "
            "model.add_bias_linear (it would bias every linear layer, experts included)"
        )
    kw = _common(c)
    kw.update(
        kv_channels=_get(c, "head_dim", None) or kw["hidden_size"] // kw["num_attention_heads"],
        qk_layernorm=True,
        add_qkv_bias=False,
        ffn_hidden_size=_get(c, "intermediate_size"),
        num_experts=_get(c, "num_experts"),
        moe_router_topk=_get(c, "num_experts_per_tok"),
        moe_ffn_hidden_size=_get(c, "moe_intermediate_size"),
        moe_layer_freq=_qwen_layer_freq(c),
        moe_router_pre_softmax=_pre_softmax(c, bool(_get(c, "norm_topk_prob", False)),
                                            "norm_topk_prob = true"),
        moe_shared_expert_intermediate_size=None,
        moe_shared_expert_gate=False,
    )
    return kw


def _read_qwen2(c: Any) -> dict[str, Any]:
    _no_sliding_window(c)
    _no_quantization(c)
    layer_types = set(getattr(c, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ConvertError(
            f"config.json: layer_types = {sorted(layer_types)}: only full_attention is supported"
        )
    shared = _get(c, "shared_expert_intermediate_size")
    if not shared:
        raise ConvertError(
            f"config.json: shared_expert_intermediate_size = {shared!r}: Qwen2-MoE always has a "
            "shared expert; expected a positive width"
        )
    kw = _common(c)
    kw.update(
        qk_layernorm=False,
        add_qkv_bias=bool(getattr(c, "qkv_bias", True)),  # transformers 4: always biased
        ffn_hidden_size=_get(c, "intermediate_size"),
        num_experts=_get(c, "num_experts"),
        moe_router_topk=_get(c, "num_experts_per_tok"),
        moe_ffn_hidden_size=_get(c, "moe_intermediate_size"),
        moe_layer_freq=_qwen_layer_freq(c),
        moe_router_pre_softmax=_pre_softmax(c, bool(_get(c, "norm_topk_prob", False)),
                                            "norm_topk_prob = true"),
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=True,
    )
    return kw


def _read_mixtral(c: Any) -> dict[str, Any]:
    _no_quantization(c)
    if getattr(c, "sliding_window", None):
        raise ConvertError(
            f"config.json: sliding_window = {c.sliding_window!r}: sliding-window attention is not "
            "supported; set it to null if your sequences are shorter than the window"
        )
    kw = _common(c)
    kw.update(
        qk_layernorm=False,
        add_qkv_bias=False,
        ffn_hidden_size=_get(c, "intermediate_size"),
        num_experts=_get(c, "num_local_experts"),
        moe_router_topk=_get(c, "num_experts_per_tok"),
        moe_ffn_hidden_size=_get(c, "intermediate_size"),
        moe_layer_freq=1,
        # Mixtral always renormalises the top-k gates
        moe_router_pre_softmax=_pre_softmax(c, True, "Mixtral's renormalised gates"),
        moe_shared_expert_intermediate_size=None,
        moe_shared_expert_gate=False,
    )
    return kw


def _read_olmoe(c: Any) -> dict[str, Any]:
    _no_quantization(c)
    clip = getattr(c, "clip_qkv", None)
    if clip is not None:
        raise ConvertError(
            f"config.json: clip_qkv = {clip!r}: clamping q, k and v is not expressible "
            "(megatron's attention has no clip); expected null"
        )
    if getattr(c, "attention_bias", False):
        raise ConvertError(
            "config.json: attention_bias = true: OLMoE then also biases o_proj, which needs "
            "model.add_bias_linear (it would bias every linear layer, experts included)"
        )
    if getattr(c, "sliding_window", None):  # OLMoE's attention passes it on when present
        raise ConvertError(
            f"config.json: sliding_window = {c.sliding_window!r}: sliding-window attention is "
            "not supported"
        )
    kw = _common(c)
    if kw["kv_channels"] is not None:
        # HF sizes q_norm from hidden_size and k_norm from hidden_size / heads, whatever
        # head_dim says: such a checkpoint does not even load in transformers.
        raise ConvertError(
            f"config.json: head_dim = {kw['kv_channels']}: OLMoE needs head_dim = hidden_size / "
            f"num_attention_heads = {kw['hidden_size'] // kw['num_attention_heads']} (its q/k "
            "norms are sized from hidden_size)"
        )
    kw.update(
        # q_norm [H h] / k_norm [G h]: one RMS statistic over the whole projection per token.
        qk_layernorm=True,
        qk_layernorm_scope="full",
        add_qkv_bias=False,
        ffn_hidden_size=_get(c, "intermediate_size"),
        num_experts=_get(c, "num_experts"),
        moe_router_topk=_get(c, "num_experts_per_tok"),
        moe_ffn_hidden_size=_get(c, "intermediate_size"),
        moe_layer_freq=1,  # every OLMoE layer is sparse
        # softmax over all experts, top-k, renormalised only with norm_topk_prob (default off)
        moe_router_pre_softmax=_pre_softmax(c, bool(_get(c, "norm_topk_prob", False)),
                                            "norm_topk_prob = true"),
        moe_shared_expert_intermediate_size=None,
        moe_shared_expert_gate=False,
    )
    return kw


# --------------------------------------------------------------------------------------------
# Writing HF configs
# --------------------------------------------------------------------------------------------


def _write_common(m: ModelConfig, family: str, architecture: str) -> dict[str, Any]:
    out = {
        "architectures": [architecture],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "hidden_act": "silu" if m.activation == "silu" else m.activation,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_scaling": None,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "initializer_range": m.init_method_std,
        "attention_dropout": m.attention_dropout,
        "torch_dtype": DTYPE_NAMES[m.params_dtype],
        "use_cache": True,
    }
    if m.kv_channels is not None:
        out["head_dim"] = m.head_dim
    return out


def _qwen_sparse_fields(m: ModelConfig) -> dict[str, Any]:
    return {
        "intermediate_size": m.ffn_hidden_size,
        "moe_intermediate_size": m.moe_ffn_hidden_size,
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.moe_router_topk,
        "norm_topk_prob": not m.moe_router_pre_softmax,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, is_moe in enumerate(m.moe_layer_pattern) if not is_moe],
        "use_sliding_window": False,
        "sliding_window": None,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }


def _write_qwen3(m: ModelConfig) -> dict[str, Any]:
    out = _write_common(m, "qwen3_moe", "Qwen3MoeForCausalLM")
    out.update(_qwen_sparse_fields(m), head_dim=m.head_dim, attention_bias=False)
    return out


def _write_qwen2(m: ModelConfig) -> dict[str, Any]:
    out = _write_common(m, "qwen2_moe", "Qwen2MoeForCausalLM")
    out.update(
        _qwen_sparse_fields(m),
        shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size or 0,
        qkv_bias=m.add_qkv_bias,
    )
    return out


def _write_mixtral(m: ModelConfig) -> dict[str, Any]:
    out = _write_common(m, "mixtral", "MixtralForCausalLM")
    out.update(
        intermediate_size=m.moe_ffn_hidden_size,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.moe_router_topk,
        sliding_window=None,
        output_router_logits=False,
        router_aux_loss_coef=0.02,
        router_jitter_noise=0.0,
    )
    return out


def _write_olmoe(m: ModelConfig) -> dict[str, Any]:
    # q/k norm scope, head_dim and dense layers are implied by the architecture: a model that
    # differs reads back differently and Family.hf_config refuses it, naming the field.
    out = _write_common(m, "olmoe", "OlmoeForCausalLM")
    out.pop("head_dim", None)  # not an OLMoE key: it is hidden_size / num_attention_heads
    out.update(
        intermediate_size=m.moe_ffn_hidden_size,
        num_experts=m.num_experts,
        num_experts_per_tok=m.moe_router_topk,
        norm_topk_prob=not m.moe_router_pre_softmax,
        clip_qkv=None,
        attention_bias=False,
        output_router_logits=False,
        router_aux_loss_coef=0.01,
    )
    return out


register_family(Family("qwen3_moe", "Qwen3MoeForCausalLM", _read_qwen3, _write_qwen3))
register_family(Family("qwen2_moe", "Qwen2MoeForCausalLM", _read_qwen2, _write_qwen2))
register_family(
    Family(
        "mixtral",
        "MixtralForCausalLM",
        _read_mixtral,
        _write_mixtral,
        moe_block="block_sparse_moe",
        expert_proj=("w1", "w3", "w2"),
    )
)
register_family(Family("olmoe", "OlmoeForCausalLM", _read_olmoe, _write_olmoe))


# --------------------------------------------------------------------------------------------
# Comparing architectures
# --------------------------------------------------------------------------------------------

_ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "head_dim",
    "vocab_size",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "normalization",
    "norm_epsilon",
    "qk_layernorm",
    "qk_layernorm_scope",
    "add_bias_linear",
    "add_qkv_bias",
    "gated_linear_unit",
    "activation",
    "untie_embeddings_and_output_weights",
    "num_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_layer_pattern",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "params_dtype",
)


def arch_differences(a: ModelConfig, b: ModelConfig) -> list[tuple[str, Any, Any]]:
    """Fields that change the weights or the forward: ``(field, a's value, b's value)``.

    Training-only settings (dispatcher, recompute, dropout, aux loss, router dtype, grouped GEMM,
    vocab padding) are not compared.
    """
    out = []
    for field in _ARCH_FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        if x != y:
            out.append((field, x, y))
    ga, gb = (
        a.num_query_groups or a.num_attention_heads,
        b.num_query_groups or b.num_attention_heads,
    )
    if ga != gb:
        out.append(("num_query_groups", a.num_query_groups, b.num_query_groups))
    dense = not all(a.moe_layer_pattern)
    if dense and a.ffn_hidden_size != b.ffn_hidden_size:
        out.append(("ffn_hidden_size", a.ffn_hidden_size, b.ffn_hidden_size))
    return out


def load_hf_config(raw: dict[str, Any]) -> Any:
    """A ``transformers`` config object from a ``config.json`` dict (transformers normalises
    aliases such as ``num_experts``/``num_local_experts`` and fills the family's defaults)."""
    from transformers import AutoConfig

    raw = dict(raw)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ConvertError("config.json: model_type is missing")
    return AutoConfig.for_model(model_type, **raw)
