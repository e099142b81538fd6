"""vp2o.rollout.lean_forward against megatron's own forward, on models of every family option:
logits and routing column by column through its KV cache against one teacher-forced megatron
forward, greedy generations equal to the megatron path's, and the fallback where it refuses."""

from __future__ import annotations

import logging

import pytest
import torch
from rollout_fixtures import TINY, char_tokenizer

from vp2o.config import load_config
from vp2o.mcore import model as mdl
from vp2o.mcore import vp2o_moe
from vp2o.rollout import RoutingRecorder, SamplingParams, attention_mask, generate, left_pad
from vp2o.rollout import position_ids as positions_of
from vp2o.rollout.lean_forward import LeanForward, Unsupported

VARIANTS = {  # name -> config overrides on top of the tiny model (2 layers, d = 64, 8 experts)
    "local": [],
    "grouped_sdpa": ["model.moe_grouped_gemm=true", "model.core_attention=sdpa"],
    "qwen3_style": ["model.qk_layernorm=true", "model.rotary_percent=0.5",
                    "model.rotary_base=1000000", "model.num_query_groups=1"],
    "qwen2_style": ["model.add_qkv_bias=true", "model.moe_router_pre_softmax=true",
                    "model.moe_shared_expert_intermediate_size=48",
                    "model.moe_shared_expert_gate=true"],
    "olmoe_style": ["model.qk_layernorm=true", "model.qk_layernorm_scope=full",
                    "model.untie_embeddings_and_output_weights=false"],
    "sigmoid_scaled_dense_layer": ["model.moe_router_score_function=sigmoid",
                                   "model.moe_router_topk_scaling_factor=2.5",
                                   "model.moe_layer_freq=[1,0]", "model.moe_router_topk=3"],
    "layernorm_gelu_absolute": ["model.normalization=LayerNorm", "model.gated_linear_unit=false",
                                "model.activation=gelu",
                                "model.position_embedding_type=learned_absolute"],
}


def _build(init_parallel, overrides, *extra):
    cfg = load_config(None, [*TINY, "algorithm=vp2o", *overrides, *extra])
    init_parallel(cfg)
    torch.manual_seed(0)
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    model.eval()
    return cfg, model


def _batch(vocab: int):
    """Three left-padded rows, six more columns; the first row finished two columns early."""
    gen = torch.Generator().manual_seed(3)
    tokens, valid = left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [9]], pad_id=0)
    tokens = torch.cat([tokens, torch.randint(3, vocab, (3, 6), generator=gen)], 1)
    valid = torch.cat([valid, torch.ones(3, 6, dtype=torch.bool)], 1)
    valid[0, -2:] = False
    return tokens, valid


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lean_forward_equals_megatron_column_by_column(init_parallel, variant):
    cfg, model = _build(init_parallel, VARIANTS[variant])
    tokens, valid = _batch(cfg.model.vocab_size)
    pos = positions_of(valid)
    n, total, width = tokens.shape[0], tokens.shape[1], 5
    with torch.no_grad(), RoutingRecorder(model) as rec:
        full = model(tokens, pos, attention_mask(valid)).float()  # [N, S, V] teacher-forced
        want_ids, want_gates = rec.take(num_rows=n, num_cols=total)  # [Lm, N, S, k]
        lean = LeanForward(model, n, total)
        assert lean.num_moe_layers == want_ids.shape[0]
        steps = [(0, width)] + [(c, c + 1) for c in range(width, total)]
        for start, end in steps:
            mask = attention_mask(valid[:, :end], query_start=start)
            out = lean(tokens[:, start:end], pos[:, start:end], start, mask)
            logits, routes = out.logits, out.routing
            assert torch.equal(out.rows, torch.arange(n))
            rows = valid[:, end - 1]
            torch.testing.assert_close(logits[rows], full[rows, end - 1], rtol=0, atol=2e-5)
            for li, (ids, gates) in enumerate(routes):  # [N, T, k] each
                real = valid[:, start:end]
                assert torch.equal(ids[real], want_ids[li, :, start:end][real])
                torch.testing.assert_close(gates[real], want_gates[li, :, start:end][real],
                                           rtol=0, atol=1e-5)


def test_finished_rows_leave_the_cache_and_the_rest_stay_exact(init_parallel):
    cfg, model = _build(init_parallel, VARIANTS["grouped_sdpa"])
    gen = torch.Generator().manual_seed(4)
    n, width, total = 8, 3, 12
    tokens = torch.randint(3, cfg.model.vocab_size, (n, total), generator=gen)
    valid = torch.ones(n, total, dtype=torch.bool)
    ends = torch.tensor([12, 5, 6, 12, 4, 9, 12, 7])  # row r has real tokens before ends[r]
    valid &= torch.arange(total) < ends.unsqueeze(1)
    pos = positions_of(valid)
    with torch.no_grad():
        full = model(tokens, pos, attention_mask(valid)).float()
        lean = LeanForward(model, n, total)
        lean(tokens[:, :width], pos[:, :width], 0, attention_mask(valid[:, :width]))
        cached = []
        for col in range(width, total):
            active = valid[:, col]
            out = lean(tokens[:, col:col + 1], pos[:, col:col + 1], col,
                       attention_mask(valid[:, :col + 1], query_start=col), active=active)
            cached.append(out.rows.numel())
            assert active[out.rows].sum() == active.sum()  # every active row is computed
            torch.testing.assert_close(out.logits[active[out.rows]], full[active, col],
                                       rtol=0, atol=2e-5)
        with pytest.raises(ValueError, match="left the cache"):
            lean(tokens[:, -1:], pos[:, -1:], total - 1,
                 attention_mask(valid, query_start=total - 1), active=torch.ones(n, dtype=bool))
    # active per column 3..11: 8 7 6 5 4 4 3 3 3; the finished leave when the active rows are
    # at most 3/4 of the cached ones: 6 of 8, then 4 of 6, then 3 of 4
    assert cached == [8, 8, 6, 6, 4, 4, 3, 3, 3]


def test_lean_forward_in_bf16_is_close_to_megatron(init_parallel):
    cfg, model = _build(init_parallel, VARIANTS["grouped_sdpa"], "model.params_dtype=bf16")
    tokens, valid = _batch(cfg.model.vocab_size)
    pos = positions_of(valid)
    with torch.no_grad():
        full = model(tokens, pos, attention_mask(valid)).float()
        lean = LeanForward(model, *tokens.shape)
        logits = lean(tokens, pos, 0, attention_mask(valid)).logits
    assert logits.dtype == torch.float32
    # bf16 rounding of two op orders: a few units of bf16's 2^-8 relative step
    torch.testing.assert_close(logits, full[:, -1], rtol=0, atol=0.05)


@pytest.mark.parametrize("variant", ["local", "qwen2_style"])
def test_greedy_generation_and_routes_equal_the_megatron_path(init_parallel, variant):
    cfg, model = _build(init_parallel, VARIANTS[variant])
    tok = char_tokenizer(cfg.model.vocab_size)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, group_size=2,
                            record_routing=True)
    out = {lean: generate(model, prompts, params, tokenizer=tok, lean=lean,
                          generator=torch.Generator().manual_seed(0)) for lean in (True, False)}
    a, b = out[True], out[False]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.valid, b.valid)
    torch.testing.assert_close(a.behavior_logprobs, b.behavior_logprobs, rtol=0, atol=1e-5)
    assert torch.equal(a.routing_ids, b.routing_ids)
    torch.testing.assert_close(a.routing_gates, b.routing_gates, rtol=0, atol=1e-5)


def test_sampling_with_early_stops_equals_the_megatron_path(init_parallel):
    cfg, model = _build(init_parallel, VARIANTS["grouped_sdpa"])
    tok = char_tokenizer(cfg.model.vocab_size)
    # a tenth of the vocabulary stops a row: rows finish at different steps and leave the
    # lean forward's cache
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=10, group_size=4,
                            stop_token_ids=tuple(range(3, cfg.model.vocab_size, 10)),
                            record_routing=True)
    out = {lean: generate(model, [[5, 6, 7], [8]], params, tokenizer=tok, lean=lean,
                          generator=torch.Generator().manual_seed(5)) for lean in (True, False)}
    a, b = out[True], out[False]
    lengths = a.response_lengths.tolist()
    assert min(lengths) < 6 and max(lengths) == 10, lengths  # early stops and a full row
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.valid, b.valid)
    torch.testing.assert_close(a.behavior_logprobs, b.behavior_logprobs, rtol=0, atol=1e-5)
    assert torch.equal(a.routing_ids, b.routing_ids)
    torch.testing.assert_close(a.routing_gates, b.routing_gates, rtol=0, atol=1e-5)


def test_refused_model_falls_back_to_megatrons_forward(init_parallel, monkeypatch, caplog):
    cfg, model = _build(init_parallel, VARIANTS["local"])
    # token dropping: megatron's routing drops over-capacity tokens, which the lean path does not
    monkeypatch.setattr(model.config, "moe_expert_capacity_factor", 1.0)
    with pytest.raises(Unsupported, match="moe_expert_capacity_factor"):
        LeanForward(model, 2, 8)
    tok = char_tokenizer(cfg.model.vocab_size)
    params = SamplingParams(temperature=0.0, max_new_tokens=4, group_size=2)
    with caplog.at_level(logging.INFO, logger="vp2o.rollout.generate"):
        a = generate(model, [[5, 6, 7]], params, tokenizer=tok,
                     generator=torch.Generator().manual_seed(0))
    assert "moe_expert_capacity_factor" in caplog.text
    b = generate(model, [[5, 6, 7]], params, tokenizer=tok, lean=False,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.behavior_logprobs, b.behavior_logprobs)  # the same (megatron) path
