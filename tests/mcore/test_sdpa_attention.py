"""``model.core_attention = sdpa`` (vp2o.mcore.sdpa_attention) against megatron's local
``DotProductAttention``: the same weights and tokens give the same log-probs and gradients (fp32),
with left and right padding, and the same greedy generation through the static KV cache."""

from __future__ import annotations

import pytest
import torch

from vp2o.config import ConfigError, load_config
from vp2o.mcore import model as mdl
from vp2o.mcore import parallel, vp2o_moe
from vp2o.mcore.sdpa_attention import SDPAttention
from vp2o.rollout import SamplingParams, generate, left_pad, position_ids, sequence_logprobs

TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",  # grouped-query attention
    "model.moe_ffn_hidden_size=32",
    "model.vocab_size=64",
    "model.init_method_std=0.05",
    "model.qk_layernorm=true",
]


@pytest.fixture(scope="module")
def models():
    """(local, sdpa) tiny VP2O MoE models with the same weights."""
    cfg = load_config(None, TINY)
    parallel.initialize(cfg, seed=1234)
    torch.manual_seed(0)
    local = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    cfg_sdpa = load_config(None, [*TINY, "model.core_attention=sdpa"])
    sdpa = mdl.build_model(cfg_sdpa, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg_sdpa))
    sdpa.load_state_dict(local.state_dict())
    yield local, sdpa
    parallel.destroy()
    torch.manual_seed(0)


def _padded_batch():
    """Left-padded prompts with right-padded responses of different lengths: [4, 13]."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (3, 7, 5, 1)]
    responses = [6, 2, 0, 5]
    tokens, valid = left_pad(prompts, pad_id=0)
    width = tokens.shape[1]
    total = width + max(responses)
    tokens = torch.cat([tokens, torch.randint(3, 64, (4, total - width), generator=gen)], 1)
    valid = torch.cat([valid, torch.zeros(4, total - width, dtype=torch.bool)], 1)
    for row, n in enumerate(responses):
        valid[row, width:width + n] = True
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    return tokens, position_ids(valid), valid


def test_spec_installs_sdpa_only_when_asked(models):
    local, sdpa = models
    kinds = lambda m: {type(x) for n, x in m.named_modules() if n.endswith("core_attention")}  # noqa: E731
    assert SDPAttention not in kinds(local)
    assert kinds(sdpa) == {SDPAttention}


def test_logprobs_and_gradients_equal_local(models):
    batch = _padded_batch()
    grads, logps = [], []
    for model in models:
        model.zero_grad(set_to_none=True)
        logp = sequence_logprobs(model, batch, temperature=1.0)  # [N, S], 0 off real pairs
        weights = torch.linspace(0.5, 1.5, logp.numel()).view_as(logp)  # a generic linear loss
        (logp * weights).sum().backward()
        logps.append(logp.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert logps[0].abs().sum() > 0
    torch.testing.assert_close(logps[1], logps[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        # atol relative to the tensor's largest entry: summed gradients (the embedding's) have
        # entries near 0 after cancellation, where fp32 rounding of a different kernel (or
        # thread count: OMP_NUM_THREADS=1 gave 2.6e-6 on a 0.015 entry) is not an error.
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4,
                                   atol=max(1e-6, 1e-4 * float(g.abs().max())),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_no_mask_is_causal_like_local(models):
    tokens = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9).expand(2, -1)
    with torch.no_grad():
        out = [m(tokens, pos, None) for m in models]
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)


def test_greedy_generation_equal_local(models):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, group_size=2)
    out = [generate(m, prompts, params, tokenizer=_Tok(), generator=torch.Generator())
           for m in models]
    assert torch.equal(out[1].tokens, out[0].tokens)
    assert torch.equal(out[1].valid, out[0].valid)
    torch.testing.assert_close(out[1].behavior_logprobs, out[0].behavior_logprobs,
                               rtol=0, atol=1e-5)


class _Tok:
    """Ids only: eos 2 (never sampled by chance alone here), pad 0."""

    eos_id, pad_id = 2, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_refused_with_transformer_engine_impl():
    with pytest.raises(ConfigError, match="model.transformer_impl"):
        load_config(None, ["model.core_attention=sdpa",
                           "model.transformer_impl=transformer_engine"])
