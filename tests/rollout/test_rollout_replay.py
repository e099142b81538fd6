"""Routing records of a plain megatron model (no VP2O layers) against megatron's RouterReplay:
the recorded ids are what RouterReplay records, and replaying them in the learner forward (GRPO's
R3) reproduces the behaviour log-probs."""

from __future__ import annotations

import torch
from rollout_fixtures import TINY, char_tokenizer

from vp2o.config import load_config
from vp2o.mcore import model as mdl
from vp2o.mcore import router_replay
from vp2o.rollout import SamplingParams, attention_mask, generate, replay_indices, sequence_logprobs


def test_records_match_router_replay_and_replay_reproduces_logprobs(init_parallel):
    from megatron.core.transformer.moe.router_replay import RouterReplay

    cfg = load_config(None, [*TINY, "model.moe_enable_routing_replay=true"])
    init_parallel(cfg)
    torch.manual_seed(0)
    model = mdl.build_model(cfg)
    tok = char_tokenizer(cfg.model.vocab_size)
    prompts = [[3, 4, 5], [6], [7, 8, 9, 10, 11]]
    try:
        params = SamplingParams(
            temperature=0.8, max_new_tokens=6, group_size=2, record_routing=True
        )
        batch = generate(
            model, prompts, params, tokenizer=tok, generator=torch.Generator().manual_seed(0)
        )
        n, s = batch.tokens.shape
        v = batch.valid

        router_replay.record(model)
        model.eval()
        with torch.no_grad():
            model(batch.tokens, batch.position_ids, attention_mask(v))
        recorded = router_replay.recorded(model)
        router_replay.stop(model)
        assert len(recorded) == batch.routing_ids.shape[0]
        for layer, ids in enumerate(recorded):
            ids = ids.sort(-1).values.view(s, n, -1).transpose(0, 1)  # [N, S, k]
            assert torch.equal(batch.routing_ids[layer][v], ids[v])

        # R3: the learner forward under the actor's routing gives the behaviour log-probs.
        model.train()
        router_replay.replay(model, replay_indices(batch.routing_ids))
        learner = sequence_logprobs(model, batch, temperature=batch.logprob_temperature)
        router_replay.stop(model)
        torch.testing.assert_close(learner.detach(), batch.behavior_logprobs, rtol=0, atol=1e-4)

        # One new token: the final routing-only forward still records it.
        one = generate(
            model,
            prompts,
            SamplingParams(max_new_tokens=1, record_routing=True),
            tokenizer=tok,
            generator=torch.Generator().manual_seed(1),
        )
        assert one.tokens.shape[1] == 6 and one.response_lengths.tolist() == [1, 1, 1]
        assert (one.routing_ids[:, :, -1] >= 0).all()
    finally:
        RouterReplay.clear_global_router_replay_instances()
