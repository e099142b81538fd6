"""vp2o.rollout.generate on real megatron-core (one process, CPU): the KV cache, sampling, stops,
routing records and the behaviour log-probs against teacher-forced forwards."""

from __future__ import annotations

import pytest
import torch

from vp2o.mcore import vp2o_moe
from vp2o.rollout import (
    RoutingRecorder,
    SamplingParams,
    attention_mask,
    generate,
    left_pad,
    position_ids,
    sequence_logprobs,
)
from vp2o.rollout.generate import _forward, _static_context

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [18]]


def _gen(tiny, params, seed=0, prompts=PROMPTS):
    return generate(
        tiny.model,
        prompts,
        params,
        tokenizer=tiny.tokenizer,
        generator=torch.Generator().manual_seed(seed),
    )


def _full_logits(model, batch, temperature=1.0):
    """Plain no-cache forward over the whole batch, logits / temperature, [N, S, V] fp32."""
    model.eval()
    with torch.no_grad():
        logits = model(batch.tokens, batch.position_ids, attention_mask(batch.valid))
    return logits.float() / temperature


def _check_layout(batch, prompts, group):
    n = len(prompts) * group
    width = max(len(p) for p in prompts)
    assert batch.tokens.shape[0] == n and batch.prompt_width == width
    assert batch.group_ids.tolist() == [i for i in range(len(prompts)) for _ in range(group)]
    for row in range(n):
        p = prompts[row // group]
        assert batch.tokens[row, width - len(p) : width].tolist() == p
        assert not batch.valid[row, : width - len(p)].any()
        length = int(batch.response_lengths[row])
        assert batch.response_mask[row, width : width + length].all()
        assert not batch.valid[row, width + length :].any()
        assert batch.position_ids[row, width - len(p) : width + length].tolist() == list(
            range(len(p) + length)
        )
    assert torch.equal(
        batch.response_mask, batch.valid & (torch.arange(batch.tokens.shape[1]) >= width)
    )


def test_kv_cache_decode_logits_equal_full_forward(tiny):
    model = tiny.model
    model.eval()
    gen = torch.Generator().manual_seed(3)
    tokens, valid = left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [9]], pad_id=0)
    tail = torch.randint(3, 60, (3, 6), generator=gen)
    tokens = torch.cat([tokens, tail], 1)
    valid = torch.cat([valid, torch.ones(3, 6, dtype=torch.bool)], 1)
    valid[0, -2:] = False  # a row that finished: pads fed to the cache
    pos = position_ids(valid)
    width, total = 5, tokens.shape[1]
    with torch.no_grad():
        full = model(tokens, pos, attention_mask(valid))  # [N, S, V]
        ctx = _static_context(3, total)
        out = _forward(
            model, tokens[:, :width], pos[:, :width], attention_mask(valid[:, :width]), ctx
        )
        torch.testing.assert_close(out[:, -1], full[:, width - 1], rtol=0, atol=1e-5)
        ctx.increment_sequence_len_offset(width)
        ctx.enable_decode_mode()
        for col in range(width, total):
            mask = attention_mask(valid[:, : col + 1], query_start=col)
            out = _forward(model, tokens[:, col : col + 1], pos[:, col : col + 1], mask, ctx)
            ctx.increment_sequence_len_offset(1)
            rows = valid[:, col]
            torch.testing.assert_close(out[rows, -1], full[rows, col], rtol=0, atol=1e-5)


def test_behaviour_logprobs_equal_teacher_forced(tiny):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, group_size=2)
    tiny.model.train()
    batch = _gen(tiny, params, seed=1)
    assert tiny.model.training  # generate runs in eval mode and restores the caller's mode
    _check_layout(batch, PROMPTS, 2)
    assert batch.behavior_logprobs[~batch.response_mask].abs().max() == 0
    model = tiny.model  # the learner's mode (train), with grad
    model.zero_grad()
    learner = sequence_logprobs(model, batch, temperature=params.temperature)
    torch.testing.assert_close(learner, batch.behavior_logprobs, rtol=0, atol=1e-4)
    learner.sum().backward()
    assert model.output_layer.weight.grad.abs().sum() > 0
    model.zero_grad()
    # Same log-probs from the (tokens, position_ids, valid) form at response positions.
    with torch.no_grad():
        plain = sequence_logprobs(
            model, (batch.tokens, batch.position_ids, batch.valid), temperature=1.0
        )
    torch.testing.assert_close(plain[batch.response_mask], learner.detach()[batch.response_mask])


def test_temperature_scaling_consistent(tiny):
    temperature = 0.6
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=8, group_size=2)
    batch = _gen(tiny, params, seed=2)
    assert batch.logprob_temperature == temperature
    full = _full_logits(tiny.model, batch, temperature)
    want = torch.zeros_like(batch.behavior_logprobs)
    want[:, 1:] = torch.gather(
        torch.log_softmax(full[:, :-1], -1), 2, batch.tokens[:, 1:].unsqueeze(-1)
    ).squeeze(-1)
    want[~batch.response_mask] = 0
    torch.testing.assert_close(batch.behavior_logprobs, want, rtol=0, atol=1e-4)
    with torch.no_grad():
        learner = sequence_logprobs(tiny.model, batch, temperature=temperature)
    torch.testing.assert_close(learner, batch.behavior_logprobs, rtol=0, atol=1e-4)
    # A learner at another temperature does not agree.
    with torch.no_grad():
        other = sequence_logprobs(tiny.model, batch, temperature=1.0)
    assert (other - learner)[batch.response_mask].abs().max() > 1e-3


def test_greedy_is_deterministic_and_argmax_of_full_forward(tiny):
    params = SamplingParams(temperature=0.0, max_new_tokens=8, group_size=2)
    a, b = _gen(tiny, params, seed=0), _gen(tiny, params, seed=99)
    assert a.logprob_temperature == 1.0
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens[0::2], a.tokens[1::2])  # both samples of a prompt agree
    full = _full_logits(tiny.model, a)
    resp = a.response_mask[:, 1:]
    assert torch.equal(full[:, :-1].argmax(-1)[resp], a.tokens[:, 1:][resp])
    # Greedy log-probs are scored at temperature 1.
    with torch.no_grad():
        learner = sequence_logprobs(tiny.model, a, temperature=0.0)
    torch.testing.assert_close(learner, a.behavior_logprobs, rtol=0, atol=1e-4)
    # top-k = 1 and a tiny top-p sample the argmax whatever the temperature and seed.
    for extra in (dict(top_k=1), dict(top_p=1e-6)):
        topk = _gen(tiny, SamplingParams(temperature=1.3, max_new_tokens=8, group_size=2, **extra))
        assert torch.equal(topk.tokens, a.tokens)


def test_sampling_reproducible_from_generator(tiny, capsys):
    params = SamplingParams(temperature=1.0, max_new_tokens=6, group_size=3)
    a, c = _gen(tiny, params, seed=7), _gen(tiny, params, seed=8)
    b = generate(
        tiny.model,
        PROMPTS,
        params,
        tokenizer=tiny.tokenizer,
        generator=torch.Generator().manual_seed(7),
        progress=True,
    )
    assert "generate" in capsys.readouterr().err  # the progress bar
    assert torch.equal(a.tokens, b.tokens) and a.completions == b.completions
    assert not torch.equal(a.tokens, c.tokens)


def test_stop_tokens_and_strings_truncate(tiny):
    base = _gen(tiny, SamplingParams(temperature=0.0, max_new_tokens=10))
    width = base.prompt_width
    responses = [
        base.tokens[n, width : width + int(base.response_lengths[n])].tolist()
        for n in range(len(PROMPTS))
    ]
    # A row without special ids, so that characters and tokens correspond one to one.
    row = next(n for n, r in enumerate(responses) if min(r) >= 3 and len(set(r[2:])) > 1)
    response = responses[row]
    # Stop token: the first position where a token appears that did not appear before.
    cut = next(i for i in range(2, len(response)) if response[i] not in response[:i])
    stopped = _gen(
        tiny, SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=[response[cut]])
    )
    assert int(stopped.response_lengths[row]) == cut + 1
    assert stopped.tokens[row, width : width + cut + 1].tolist() == response[: cut + 1]
    assert not stopped.truncated[row] and not stopped.valid[row, width + cut + 1 :].any()
    # Stop string: two characters of the decoded response, ending at token `cut`.
    text = tiny.tokenizer.decode(response)
    needle = text[cut - 1 : cut + 1]
    first_end = text.index(needle) + len(needle)  # chars = tokens for the char tokenizer
    by_string = _gen(
        tiny, SamplingParams(temperature=0.0, max_new_tokens=10, stop_strings=[needle])
    )
    assert int(by_string.response_lengths[row]) == first_end
    assert by_string.completions[row] == text[:first_end]
    assert not by_string.truncated[row]
    # Rows unaffected by the stop run exactly as before; EOS always stops.
    for n in range(len(PROMPTS)):
        length = int(by_string.response_lengths[n])
        assert by_string.tokens[n, width : width + length].tolist() == (
            base.tokens[n, width : width + length].tolist()
        )


def test_eos_stops_and_finished_rows_are_padded(tiny):
    eos = tiny.tokenizer.eos_id
    params = SamplingParams(temperature=1.5, max_new_tokens=12, group_size=4)
    batch = _gen(tiny, params, seed=11)
    ended = False
    for n in range(batch.num_sequences):
        resp = batch.tokens[n][batch.response_mask[n]].tolist()
        assert eos not in resp[:-1]
        if resp[-1] == eos:
            ended = True
            assert not batch.truncated[n]
        else:
            assert batch.truncated[n] == (len(resp) == 12)
        assert (batch.tokens[n][~batch.valid[n]] == tiny.tokenizer.pad_id).all()
    assert ended, "seed gives no EOS: pick another"


def test_routing_records_equal_teacher_forced_routers(tiny):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, group_size=2, record_routing=True)
    batch = _gen(tiny, params, seed=4)
    layers = vp2o_moe.moe_layers(tiny.model)
    n, s = batch.tokens.shape
    assert batch.routing_ids.shape == (len(layers), n, s, tiny.cfg.model.moe_router_topk)
    assert (batch.routing_ids[:, ~batch.valid] == -1).all()
    assert (batch.routing_gates[:, ~batch.valid] == 0).all()
    _full_logits(tiny.model, batch)  # teacher-forced forward: VP2ORouter keeps last_routing
    for li, layer in enumerate(layers):
        rec = layer.router.last_routing
        ids = rec.ids.view(s, n, -1).transpose(0, 1)  # rows s * N + n -> [N, S, k]
        gates = rec.gates.view(s, n, -1).transpose(0, 1)
        v = batch.valid  # prompts and responses are both recorded
        assert torch.equal(batch.routing_ids[li][v], ids[v])
        torch.testing.assert_close(batch.routing_gates[li][v], gates[v], rtol=0, atol=1e-5)
    # The recorder gives the same through its own hooks on the same forward.
    with RoutingRecorder(tiny.model) as rec:
        _full_logits(tiny.model, batch)
        ids, _ = rec.take(num_rows=n, num_cols=s)
    assert torch.equal(ids[:, batch.valid], batch.routing_ids[:, batch.valid])


def test_rejects_empty_prompt(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        _gen(tiny, SamplingParams(max_new_tokens=2), prompts=[[1, 2], []])
