"""HF config <-> ModelConfig for each family; fields the builder cannot express stop with a
message naming them."""

from __future__ import annotations

import dataclasses

import pytest
from convert_fixtures import HF_CONFIGS, SUPPORTED

from vp2o.config import ModelConfig
from vp2o.convert import ConvertError, family_for, get_family
from vp2o.convert.families import arch_differences, load_hf_config


def _hf(family: str, **overrides) -> dict:
    """A config.json dict as transformers writes it for the tiny test config."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, **{**HF_CONFIGS[family], **overrides})
    raw = config.to_dict()
    raw["architectures"] = [get_family(family).architecture]
    return raw


@pytest.mark.parametrize("family", SUPPORTED)
def test_config_round_trip_is_a_fixpoint(family):
    fam = get_family(family)
    m = fam.model_config(load_hf_config(_hf(family)))
    written = fam.hf_config(m)  # checks internally that it reads back as the same architecture
    assert written["architectures"] == [fam.architecture]
    again = fam.model_config(load_hf_config(written))
    assert arch_differences(m, again) == []
    assert m.max_position_embeddings == again.max_position_embeddings == 256


def test_family_specific_fields():
    q3 = get_family("qwen3_moe").model_config(load_hf_config(_hf("qwen3_moe")))
    assert (q3.qk_layernorm, q3.kv_channels, q3.num_query_groups) == (True, 12, 2)
    assert q3.moe_layer_freq == [1, 0, 1] and q3.ffn_hidden_size == 48
    assert q3.moe_router_pre_softmax is False and q3.rotary_base == 1_000_000
    q2 = get_family("qwen2_moe").model_config(load_hf_config(_hf("qwen2_moe")))
    assert (q2.add_qkv_bias, q2.moe_shared_expert_intermediate_size) == (True, 24)
    assert q2.moe_shared_expert_gate and q2.moe_router_pre_softmax
    assert not q2.untie_embeddings_and_output_weights
    mx = get_family("mixtral").model_config(load_hf_config(_hf("mixtral")))
    assert (mx.num_experts, mx.moe_ffn_hidden_size, mx.num_query_groups) == (4, 16, 1)
    assert mx.kv_channels is None and mx.moe_router_pre_softmax is False
    ol = get_family("olmoe").model_config(load_hf_config(_hf("olmoe")))
    assert (ol.qk_layernorm, ol.qk_layernorm_scope, ol.num_query_groups) == (True, "full", 2)
    assert ol.moe_router_pre_softmax is True and ol.moe_layer_freq == 1
    assert ol.moe_ffn_hidden_size == 16 and ol.untie_embeddings_and_output_weights
    assert (q3.qk_layernorm_scope, mx.qk_layernorm_scope) == ("head", "head")


def test_family_lookup():
    assert family_for({"architectures": ["MixtralForCausalLM"]}).name == "mixtral"
    assert family_for({"model_type": "qwen3_moe"}).name == "qwen3_moe"
    with pytest.raises(ConvertError, match="unknown architecture.*DeepseekV3ForCausalLM"):
        family_for({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"})
    with pytest.raises(ConvertError, match="unknown family 'llama'"):
        get_family("llama")


@pytest.mark.parametrize(
    "family, overrides, field",
    [
        ("qwen3_moe", {"hidden_act": "gelu"}, "hidden_act"),
        ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
        ("qwen3_moe", {"use_sliding_window": True}, "use_sliding_window"),
        (
            "qwen3_moe",
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "rope_theta": 1e6,
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
            "rope_type = 'yarn'",
        ),
        ("mixtral", {"sliding_window": 4096}, "sliding_window"),
        ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv = 8.0"),
        ("olmoe", {"attention_bias": True}, "attention_bias"),
        ("olmoe", {"head_dim": 16}, "head_dim = 16"),
        # top-1 with renormalised gates: megatron-core refuses a softmax over one logit
        ("mixtral", {"num_experts_per_tok": 1}, "num_experts_per_tok = 1 with Mixtral"),
        ("qwen3_moe", {"num_experts_per_tok": 1, "norm_topk_prob": True},
         "num_experts_per_tok = 1 with norm_topk_prob = true"),
        ("olmoe", {"num_experts_per_tok": 1, "norm_topk_prob": True},
         "num_experts_per_tok = 1 with norm_topk_prob = true"),
        # no sparse layer left: named by the HF fields, not by model.moe_layer_freq
        ("qwen3_moe", {"mlp_only_layers": [0, 1, 2]}, "mlp_only_layers = [0, 1, 2]"),
        ("qwen2_moe", {"decoder_sparse_step": 3}, "decoder_sparse_step = 3"),
    ],
)
def test_inexpressible_hf_fields_are_named(family, overrides, field):
    raw = _hf(family, **overrides)
    with pytest.raises(ConvertError, match=field.replace("(", r"\(").replace("[", r"\[")):
        get_family(family).model_config(load_hf_config(raw))


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_expressible_neighbours_of_the_refusals(family):
    """``swish`` is transformers' other name for ``silu``; top-1 without renormalisation is
    megatron's softmax before the top-1 selection."""
    fam = get_family(family)
    base = fam.model_config(load_hf_config(_hf(family)))
    swish = fam.model_config(load_hf_config(_hf(family, hidden_act="swish")))
    assert arch_differences(base, swish) == []
    top1 = fam.model_config(load_hf_config(_hf(family, num_experts_per_tok=1,
                                               norm_topk_prob=False)))
    assert (top1.moe_router_topk, top1.moe_router_pre_softmax) == (1, True)


@pytest.mark.parametrize(
    "family, change, field",
    [
        ("qwen3_moe", {"moe_router_score_function": "sigmoid"}, "model.moe_router_score_function"),
        ("qwen3_moe", {"add_qkv_bias": True}, "model.add_qkv_bias"),
        ("qwen3_moe", {"moe_shared_expert_intermediate_size": 8}, "model.moe_shared_expert"),
        ("mixtral", {"moe_router_pre_softmax": True}, "model.moe_router_pre_softmax"),
        ("mixtral", {"qk_layernorm": True}, "model.qk_layernorm"),
        ("qwen3_moe", {"qk_layernorm_scope": "full"}, "model.qk_layernorm_scope"),
        ("olmoe", {"qk_layernorm_scope": "head"}, "model.qk_layernorm_scope"),
        ("olmoe", {"kv_channels": 16}, "model.head_dim"),
        ("olmoe", {"moe_layer_freq": [1, 0]}, "model.moe_layer_pattern"),
    ],
)
def test_inexpressible_model_fields_are_named_on_export(family, change, field):
    fam = get_family(family)
    m = dataclasses.replace(fam.model_config(load_hf_config(_hf(family))), **change)
    with pytest.raises(ConvertError, match=field):
        fam.hf_config(m)


def test_arch_differences_ignores_training_settings():
    a = ModelConfig()
    b = dataclasses.replace(
        a, moe_token_dispatcher_type="allgather", recompute="full", moe_aux_loss_coeff=0.1
    )
    assert arch_differences(a, b) == []
    assert arch_differences(a, dataclasses.replace(a, num_experts=16))[0][0] == "num_experts"
