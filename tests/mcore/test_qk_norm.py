"""Full-width q/k RMSNorm (OLMoE, model.qk_layernorm_scope=full): the module against an explicit
reference, its construction from megatron's config, the config checks and the spec wiring."""

from __future__ import annotations

import pytest
import torch

from vp2o.config import ConfigError, load_config
from vp2o.mcore import model as mdl
from vp2o.mcore.qk_norm import FullWidthKNorm, FullWidthQNorm, FullWidthRMSNorm

EPS = 1e-5


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Written from the definition: flatten the heads, RMSNorm the row, unflatten."""
    *lead, heads, hn = x.shape
    flat = x.reshape(*lead, heads * hn).double()  # [..., heads hn]
    rms = flat.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    return (flat / rms * weight.double()).reshape(x.shape).to(x.dtype)


def _heads_of_different_scales(shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    scale = torch.arange(1, shape[-2] + 1, dtype=torch.float32)  # head i scaled by i + 1
    return x * scale[:, None]


@pytest.mark.parametrize("shape", [(5, 2, 4, 8), (7, 2, 8)])  # [sq, b, np, hn] and packed [t, ...]
def test_matches_reference_and_differs_from_per_head(shape):
    heads, hn = shape[-2:]
    norm = FullWidthRMSNorm(heads, hn, EPS)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(heads * hn, generator=torch.Generator()))
    x = _heads_of_different_scales(shape)
    y = norm(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, _reference(x, norm.weight, EPS), rtol=1e-6, atol=1e-6)
    # megatron's per-head norm (one statistic per head) gives something else on the same input,
    # whatever its [hn] weight: every head of its output has unit RMS before the weight.
    per_head = torch.nn.RMSNorm(hn, eps=EPS)(x)
    assert (per_head - y).abs().max() > 0.1
    rms_per_head = y.reshape(*shape[:-2], heads, hn).pow(2).mean(-1).sqrt()
    assert rms_per_head.std() > 0.1  # the heads keep their relative scales


def test_matches_hf_olmoe_rmsnorm_on_the_flat_projection():
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    hf = OlmoeRMSNorm(4 * 8, eps=EPS)
    ours = FullWidthRMSNorm(4, 8, EPS)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(32, generator=torch.Generator().manual_seed(1)))
        ours.weight.copy_(hf.weight)
    x = _heads_of_different_scales((6, 2, 4, 8))
    torch.testing.assert_close(ours(x).reshape(6, 2, 32), hf(x.reshape(6, 2, 32)), rtol=0, atol=0)


def test_bf16_keeps_dtype_and_gradients_reach_the_weight():
    norm = FullWidthRMSNorm(4, 8, EPS, torch.bfloat16)
    x = _heads_of_different_scales((3, 2, 4, 8)).bfloat16().requires_grad_()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def _tconfig(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2)
    return TransformerConfig(**{**base, **kw})


def test_built_from_megatron_config_like_its_norms():
    config = _tconfig(kv_channels=8, params_dtype=torch.bfloat16)
    q = FullWidthQNorm(config=config, hidden_size=8, eps=1e-6)  # SelfAttention's call
    k = FullWidthKNorm(config=config, hidden_size=8, eps=1e-6)
    assert q.weight.shape == (4 * 8,) and k.weight.shape == (2 * 8,)
    assert q.weight.dtype == torch.bfloat16 and q.eps == 1e-6
    assert torch.equal(q.weight, torch.ones(32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="got input"):
        q(torch.zeros(3, 2, 2, 8))  # the key's shape given to the query norm


def test_tensor_parallel_is_refused_by_the_module():
    config = _tconfig(kv_channels=8, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_model_parallel_size = 1, got 2"):
        FullWidthQNorm(config=config, hidden_size=8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "model.qk_layernorm = False: expected true with model.qk_layernorm_scope=full"),
        (
            ["model.qk_layernorm=true", "model.normalization=LayerNorm"],
            "model.normalization = 'LayerNorm': expected RMSNorm",
        ),
        (
            [
                "model.qk_layernorm=true",
                "parallel.tensor_parallel=2",
                "parallel.sequence_parallel=true",
            ],
            "parallel.tensor_parallel = 2: expected 1 with model.qk_layernorm_scope=full",
        ),
    ],
)
def test_config_checks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.qk_layernorm_scope=full", *overrides])


def test_config_rejects_unknown_scope():
    with pytest.raises(ConfigError, match="model.qk_layernorm_scope"):
        load_config(None, ["model.qk_layernorm=true", "model.qk_layernorm_scope=heads"])


def test_spec_wiring_does_not_leak_into_per_head_models(init_parallel):
    """scope=full installs the full-width norms in every layer; a per-head model built
    afterwards in the same process still gets megatron's own q/k norm (the spec edit does not
    leak into megatron's spec objects)."""
    full = load_config(None, ["model.qk_layernorm=true", "model.qk_layernorm_scope=full"])
    init_parallel(full)
    model = mdl.build_model(full)
    for layer in model.decoder.layers:
        attn = layer.self_attention
        assert isinstance(attn.q_layernorm, FullWidthQNorm)
        assert isinstance(attn.k_layernorm, FullWidthKNorm)
        assert attn.q_layernorm.weight.shape == (4 * 32,)  # H h
        assert attn.k_layernorm.weight.shape == (2 * 32,)  # G h
    head = mdl.build_model(load_config(None, ["model.qk_layernorm=true"]))
    q = head.decoder.layers[0].self_attention.q_layernorm
    assert not isinstance(q, FullWidthRMSNorm) and q.weight.shape == (32,)
