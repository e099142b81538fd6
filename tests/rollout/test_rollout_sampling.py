"""vp2o.rollout sampling and layout helpers, pure tensors (no model): checked against loops."""

from __future__ import annotations

import math

import pytest
import torch

from vp2o.rollout import SamplingParams, attention_mask, left_pad, logprob_temperature
from vp2o.rollout.routing import replay_indices, routing_from_router_output
from vp2o.rollout.sampling import sample_next, truncate_logits


def _kept_by_loop(row: list[float], top_k: int, top_p: float) -> set[int]:
    """The surviving ids, from the definitions: top-k by value, then the top-p prefix."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if top_k:
        order = order[:top_k]
    z = max(row[i] for i in order)
    weights = {i: math.exp(row[i] - z) for i in order}
    total = sum(weights.values())
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += weights[i] / total
    return kept


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.8), (1, 0.3)])
def test_truncate_logits_matches_loop(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=gen) * 2
    out = truncate_logits(logits, top_k=top_k, top_p=top_p)
    for n in range(6):
        kept = {i for i in range(10) if math.isfinite(out[n, i].item())}
        assert kept == _kept_by_loop(logits[n].tolist(), top_k, top_p)
        assert torch.equal(out[n, sorted(kept)], logits[n, sorted(kept)])


def test_sampling_frequencies_follow_truncated_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    params = SamplingParams(temperature=0.8, top_k=3)
    scaled = logits / params.logprob_temperature
    tokens, logprobs = sample_next(scaled, params, torch.Generator().manual_seed(0))
    want = torch.softmax(truncate_logits(scaled[:1], top_k=3), -1)[0]
    freq = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)
    # Recorded log-probs are the untruncated tempered ones.
    full = torch.log_softmax(scaled[0], -1)
    torch.testing.assert_close(logprobs, full[tokens])


def test_sampling_is_a_function_of_generator_state():
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a, _ = sample_next(logits, params, torch.Generator().manual_seed(5))
    b, _ = sample_next(logits, params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    greedy, lp = sample_next(logits, SamplingParams(temperature=0), torch.Generator())
    assert torch.equal(greedy, logits.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).max(-1).values)


def test_sampling_params_validation():
    assert logprob_temperature(0.0) == 1.0 and logprob_temperature(0.7) == 0.7
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    for bad in (
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_k=-1),
        dict(max_new_tokens=0),
        dict(group_size=0),
        dict(stop_strings=[""]),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_left_pad_and_mask_match_loop():
    tokens, valid = left_pad([[5, 6], [7], [8, 9, 10]], pad_id=0)
    assert tokens.tolist() == [[0, 5, 6], [0, 0, 7], [8, 9, 10]]
    valid = torch.cat([valid, torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.bool)], 1)
    mask = attention_mask(valid)  # [N, 1, S, S]
    n_rows, cols = valid.shape
    for n in range(n_rows):
        for q in range(cols):
            for k in range(cols):
                allowed = (k <= q and bool(valid[n, k])) or k == q
                assert bool(mask[n, 0, q, k]) is (not allowed)
    step = attention_mask(valid, query_start=3)
    assert torch.equal(step, mask[:, :, 3:])
    with pytest.raises(ValueError):
        left_pad([[1], []], pad_id=0)


def test_routing_from_router_output_and_replay_layout():
    probs = torch.tensor([[0.0, 0.7, 0.0, 0.3], [0.4, 0.0, 0.6, 0.0]])
    ids, gates = routing_from_router_output(probs, probs > 0, 2)
    assert ids.tolist() == [[1, 3], [0, 2]]
    torch.testing.assert_close(gates, torch.tensor([[0.7, 0.3], [0.4, 0.6]]))
    rec = torch.arange(2 * 3 * 4 * 2).view(2, 3, 4, 2)  # [Lm, N, S, k]
    rec[:, 0, 0] = -1
    replay = replay_indices(rec)
    assert len(replay) == 2 and replay[0].shape == (12, 2)
    for layer in range(2):
        for s in range(4):
            for n in range(3):
                want = [0, 1] if (n, s) == (0, 0) else rec[layer, n, s].tolist()
                assert replay[layer][s * 3 + n].tolist() == want
