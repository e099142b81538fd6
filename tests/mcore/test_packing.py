"""Token-budget micro-batches (``train.max_tokens_per_microbatch``, vp2o.mcore.packing): the plan,
the block-diagonal mask, and the learner's loss, log-probs and gradients on packed micro-batches
against the padded computation (tiny model, one process, fp32), with and without router replay;
and, on the same batch, the rollout-weight log-probs that a mismatch correction takes its ratio
against when a batch is reused."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vp2o.config import load_config
from vp2o.experience import PendingBatch, in_batch_order, micro_batches
from vp2o.learner import loss_normaliser
from vp2o.mcore import model as mdl
from vp2o.mcore import packing, parallel, router_replay, vp2o_moe
from vp2o.policy_loss import PolicyLoss
from vp2o.rollout import SamplingParams, generate, replay_indices

TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.moe_ffn_hidden_size=32",
    "model.vocab_size=64",
    "model.init_method_std=0.05",
    "model.moe_enable_routing_replay=true",
    "rollout.max_new_tokens=6",
]


def test_plan_first_fit_decreasing_within_budget():
    lengths = [5, 9, 3, 12, 4, 4, 1]
    bins = packing.plan(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert [3] in bins  # longer than the budget: alone
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins if b != [3])
    assert bins == [[3], [1, 6], [0, 4], [5, 2]]  # 12 | 9 1 | 5 4 | 4 3 (by hand)
    with pytest.raises(ValueError, match="budget"):
        packing.plan(lengths, 0)


def test_equalise_splits_until_the_count():
    lengths = [5, 9, 3, 12, 4, 4, 1]
    bins = packing.equalise(packing.plan(lengths, 10), lengths, 6)
    assert len(bins) == 6 and sorted(i for b in bins for i in b) == list(range(7))
    assert all(b for b in bins)
    with pytest.raises(ValueError, match="train.max_tokens_per_microbatch"):
        packing.equalise([[0], [1]], [3, 4], 3)


def test_block_causal_mask_by_hand():
    mask = packing.block_causal_mask(torch.tensor([0, 0, 0, 1, 1, 2]))[0, 0]
    allowed = torch.zeros(6, 6, dtype=torch.bool)
    for q, k in [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 3), (4, 3), (4, 4), (5, 5)]:
        allowed[q, k] = True
    assert torch.equal(mask, ~allowed)


def test_layout_refuses_gaps():
    valid = torch.tensor([[False, True, True, False], [True, False, True, False]])
    with pytest.raises(ValueError, match="consecutive"):
        packing.packed_layout(valid)
    rows, cols = packing.packed_layout(valid[:1])
    assert rows.tolist() == [0, 0] and cols.tolist() == [1, 2]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(None, TINY)
    groups = parallel.initialize(cfg, seed=1234)
    torch.manual_seed(0)
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [18], [19, 20, 21]]
    batch = generate(model, prompts, SamplingParams(temperature=1.0, max_new_tokens=6,
                                                    group_size=2, record_routing=True),
                     tokenizer=_Tok(), generator=torch.Generator().manual_seed(5))
    # Responses of different lengths (the sampler rarely hits EOS in 6 tokens): cut some short.
    cut = torch.tensor([6, 2, 4, 0, 5, 1, 3, 6, 2, 4])
    keep = torch.arange(batch.tokens.shape[1]) < batch.prompt_width + cut.unsqueeze(1)
    batch.valid &= keep
    batch.response_mask &= keep
    batch.routing_ids = torch.where(keep.unsqueeze(0).unsqueeze(-1), batch.routing_ids, -1)
    # Move the weights off the actors' so the log-ratio and replay both matter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    adv = torch.randn(batch.num_sequences, generator=torch.Generator().manual_seed(2))
    yield cfg, groups, model, PendingBatch(batch=batch, advantages=adv, rewards=adv)
    parallel.destroy()
    torch.manual_seed(0)


class _Tok:
    eos_id, pad_id = 2, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def _loss_and_grads(cfg, groups, model, pending, max_tokens):
    """The learner's policy loss over the micro-batches, as ``Learner.gradients`` runs it (no
    DDP)."""
    policy_loss = PolicyLoss(cfg, model)
    mbs = micro_batches(pending, cfg.rollout.micro_batch_size, torch.device("cpu"),
                        loss_normaliser(pending, cfg, groups), max_tokens=max_tokens)
    model.zero_grad(set_to_none=True)
    total, logps = 0.0, []
    for mb in mbs:
        loss, stats = policy_loss(model, mb)
        loss.backward()
        total += loss.detach()
        logps.append(stats["_logp"])
    if cfg.rollout.router_replay:
        router_replay.stop(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return mbs, total, in_batch_order(logps, mbs), grads


@pytest.mark.parametrize("replay,aggregation", [(False, "token_mean"),
                                                (True, "seq_mean_token_mean")])
def test_packed_loss_and_gradients_equal_padded(tiny, replay, aggregation):
    base, groups, model, pending = tiny
    cfg = load_config(None, [*TINY, f"rollout.router_replay={str(replay).lower()}",
                             f"loss.aggregation={aggregation}", "rollout.micro_batch_size=4"])
    assert cfg.rollout.router_replay is replay
    lengths = pending.batch.valid.sum(-1)
    budget = int(lengths.sum()) // 3
    padded_mbs, loss0, logp0, grads0 = _loss_and_grads(cfg, groups, model, pending, None)
    packed_mbs, loss1, logp1, grads1 = _loss_and_grads(cfg, groups, model, pending, budget)
    assert len(padded_mbs) == 3 and not padded_mbs[0]["packed"]
    assert len(packed_mbs) >= 3 and all(mb["packed"] for mb in packed_mbs)
    assert max(len(mb["index"]) for mb in packed_mbs) >= 3  # sequences do share rows
    for mb in packed_mbs:  # within the budget unless alone
        assert len(mb["index"]) == 1 or int(lengths[mb["index"]].sum()) <= budget
    assert logp0[pending.batch.response_mask].abs().min() > 0
    torch.testing.assert_close(logp1, logp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_replay_follows_the_packed_order(tiny):
    """The actors' ids land on the packed tokens they were recorded for; replaying them in
    another order changes the log-probs, so the equality above checks the alignment."""
    cfg, groups, model, pending = tiny
    batch = pending.batch
    right = packing.packed_routing_ids(batch)  # [Lm, 1, T, k]
    rows, cols = packing.packed_layout(batch.valid)
    assert torch.equal(right[:, 0], batch.routing_ids[:, rows, cols])
    assert (right >= 0).all()  # every packed token has its actor's record
    out = []
    with torch.no_grad():
        for ids in (right, right.flip(2)):
            router_replay.replay(model, replay_indices(ids))
            out.append(packing.packed_logprobs(model, batch, temperature=1.0))
            router_replay.stop(model)
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_a_reused_batch_s_correction_uses_the_rollout_weights_logprobs(tiny):
    """``loss.correction=tis`` with two updates per batch: the rollout-weight log-probs that
    ``Learner.step`` keeps (its first update's forward, router replay on) equal the learner's
    log-probs at those weights; at those weights a micro-batch's loss with them equals the
    one-update loss (its own forward's log-probs); once the weights move, the ratio is taken
    against them (not against the new forward: the loss differs from the one-update form) and
    the loss equals policy_loss called with them directly."""
    from vp2o.rollout import sequence_logprobs

    _, groups, model, pending = tiny
    cfg = load_config(None, [*TINY, "loss.correction=tis", "train.updates_per_rollout=2",
                             "rollout.router_replay=true", "rollout.micro_batch_size=4"])
    p = PendingBatch(batch=pending.batch, advantages=pending.advantages, rewards=pending.rewards)
    policy_loss = PolicyLoss(cfg, model)
    # what Learner.step keeps: the first update's forward, in batch order
    _, _, p.rollout_logprobs, _ = _loss_and_grads(cfg, groups, model, p, None)
    batch = p.batch
    with torch.no_grad(), router_replay.replaying(model, replay_indices(batch.routing_ids)):
        expected = sequence_logprobs(model, batch, temperature=batch.logprob_temperature)
    mask = batch.response_mask
    torch.testing.assert_close(p.rollout_logprobs[mask], expected[mask], rtol=0, atol=1e-6)

    def losses():
        stored = micro_batches(p, 4, torch.device("cpu"), loss_normaliser(p, cfg, groups))
        own = micro_batches(dataclasses.replace(p, rollout_logprobs=None), 4,
                            torch.device("cpu"), loss_normaliser(p, cfg, groups))
        assert all("logp_rollout" in mb for mb in stored)
        assert not any("logp_rollout" in mb for mb in own)
        out = []
        for mbs in (stored, own):
            total = 0.0
            for mb in mbs:
                loss, _ = policy_loss(model, mb)
                total += float(loss.detach())
            router_replay.stop(model)
            out.append(total)
        return out, stored

    (with_stored, with_own), _ = losses()
    assert with_stored == pytest.approx(with_own, rel=1e-5, abs=1e-7)
    saved = {n: q.detach().clone() for n, q in model.named_parameters()}
    try:
        with torch.no_grad():  # an update moved the weights
            for q in model.parameters():
                q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(7)))
        (with_stored, with_own), stored = losses()
        assert abs(with_stored - with_own) > 1e-4
        mb = stored[0]
        b = mb["batch"]
        with router_replay.replaying(model, replay_indices(b.routing_ids)):
            logp = sequence_logprobs(model, b, temperature=b.logprob_temperature)
        # the reference, token by token: PPO's clipped ratio against the rollout weights'
        # log-probs, weighted by TIS of those against the engine's (behaviour) log-probs
        loss_cfg = cfg.loss
        assert (loss_cfg.estimator, loss_cfg.aggregation, loss_cfg.kl_coeff) == (
            "ratio", "token_mean", 0.0) and cfg.loss_clips and loss_cfg.clip_ratio_c is None
        lo, beh, adv = mb["logp_rollout"].double(), b.behavior_logprobs.double(), mb["adv"]
        total = 0.0
        for i, j in b.response_mask.nonzero().tolist():
            rho = math.exp(float(logp[i, j]) - float(lo[i, j]))
            w = min(math.exp(float(lo[i, j]) - float(beh[i, j])), loss_cfg.tis_cap)
            a = float(adv[i] if adv.dim() == 1 else adv[i, j])
            clipped = min(max(rho, 1 - loss_cfg.clip_low), 1 + loss_cfg.clip_high)
            total += -min(rho * a, clipped * a) * w
        ref = total / float(mb["denominator"])
        loss, _ = policy_loss(model, mb)
        router_replay.stop(model)
        assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-6, abs=1e-8)
    finally:
        with torch.no_grad():
            for n, q in model.named_parameters():
                q.copy_(saved[n])
