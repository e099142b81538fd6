"""GPTModel + MoE built by vp2o.mcore.model: every supported family shape on CPU."""

from __future__ import annotations

import pytest
import torch

from vp2o.config import ConfigError, load_config
from vp2o.mcore import model as mdl

# Tiny versions of each family's distinguishing features.
SHAPES = {
    "qwen3_moe": [  # GQA, qk-norm, explicit head dim, renormalised top-k, untied, no biases
        "model.qk_layernorm=true",
        "model.kv_channels=48",
        "model.num_query_groups=2",
    ],
    "qwen2_moe": [  # shared expert with sigmoid gate, QKV bias, softmax before top-k
        "model.add_qkv_bias=true",
        "model.moe_shared_expert_intermediate_size=96",
        "model.moe_shared_expert_gate=true",
        "model.moe_router_pre_softmax=true",
        "model.num_query_groups=null",
    ],
    "mixtral": ["model.moe_router_topk=2", "model.num_query_groups=1"],
    "olmoe": [  # q/k RMSNorm over the whole projection (not per head)
        "model.qk_layernorm=true",
        "model.qk_layernorm_scope=full",
        "model.untie_embeddings_and_output_weights=false",
        "model.num_query_groups=null",
    ],
    "sigmoid_router_mixed_layers": [
        "model.moe_router_score_function=sigmoid",
        "model.moe_layer_freq=[0,1,1,0]",
    ],
}


def expected_param_count(cfg) -> int:
    """Parameter count from the architecture, written from the config (independent of megatron)."""
    m = cfg.model
    d, hd, heads = m.hidden_size, m.head_dim, m.num_attention_heads
    groups = m.num_query_groups or heads
    vocab = mdl.padded_vocab_size(cfg)
    attn = d * hd * (heads + 2 * groups) + hd * heads * d
    if m.add_qkv_bias:
        attn += hd * (heads + 2 * groups)
    if m.qk_layernorm and m.qk_layernorm_scope == "full":
        attn += hd * (heads + groups)  # q_norm [H h] + k_norm [G h]
    elif m.qk_layernorm:
        attn += 2 * hd  # one [h] weight each, shared by the heads
    glu = 2 if m.gated_linear_unit else 1
    dense_mlp = d * m.ffn_hidden_size * glu + m.ffn_hidden_size * d
    expert = d * m.moe_ffn_hidden_size * glu + m.moe_ffn_hidden_size * d
    moe = m.num_experts * expert + m.num_experts * d  # experts + router
    if m.moe_shared_expert_intermediate_size:
        s = m.moe_shared_expert_intermediate_size
        moe += d * s * glu + s * d + (d if m.moe_shared_expert_gate else 0)
    norms = 2 * d  # input_layernorm + pre_mlp_layernorm per layer
    total = 0
    for is_moe in m.moe_layer_pattern:
        total += attn + norms + (moe if is_moe else dense_mlp)
    total += vocab * d + d  # embedding + final norm
    if m.untie_embeddings_and_output_weights:
        total += vocab * d
    return total


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_family_shape_forward_backward(init_parallel, shape):
    cfg = load_config(
        None,
        [
            "model.num_layers=4",
            "model.hidden_size=96",
            "model.num_attention_heads=4",
            *SHAPES[shape],
        ],
    )
    init_parallel(cfg)
    model = mdl.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(cfg)

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=gen)
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    logits = model(tokens, pos, None)  # [B, S, V]
    assert logits.shape == (2, 12, mdl.padded_vocab_size(cfg))
    assert torch.isfinite(logits).all()

    # Causality: changing the last token leaves every earlier position's logits unchanged.
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.model.vocab_size
    logits2 = model(changed, pos, None)
    torch.testing.assert_close(logits2[:, :-1], logits[:, :-1], rtol=0, atol=1e-5)
    assert not torch.allclose(logits2[:, -1], logits[:, -1])

    # Labels path: megatron's per-token loss is the cross-entropy of the returned logits.
    labels = torch.roll(tokens, -1, dims=1)
    per_token = model(tokens, pos, None, labels=labels)  # [B, S]
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none"
    ).view(2, 12)
    torch.testing.assert_close(per_token.float(), ref, rtol=1e-5, atol=1e-5)

    per_token.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for n, g in grads.items() if "experts" not in n), "dense grads"
    routers = [g for n, g in grads.items() if n.endswith("router.weight")]
    assert routers and all(g.abs().sum() > 0 for g in routers)
    expert_grads = [g for n, g in grads.items() if ".experts." in n and g is not None]
    assert sum(int(g.abs().sum() > 0) for g in expert_grads) >= 2
    for name, p in model.named_parameters():
        assert getattr(p, "allreduce", True) is (not mdl.is_expert_param(name))


def test_global_param_name():
    n = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    assert mdl.global_param_name(n, ep_rank=2, num_local_experts=4) == (
        "decoder.layers.1.mlp.experts.local_experts.11.linear_fc2.weight"
    )
    assert (
        mdl.global_param_name("decoder.layers.1.mlp.router.weight", ep_rank=2, num_local_experts=4)
        == "decoder.layers.1.mlp.router.weight"
    )


def test_tensor_parallel_moe_needs_transformer_engine_norms():
    """TP > 1 with MoE needs sequence parallelism, which megatron's torch norms refuse: the
    builder says so by field name (on a machine without transformer-engine + CUDA, like CI)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    from vp2o.config import ConfigError
    from vp2o.mcore.model import check_sequence_parallel_norms

    # The megatron fact the check stands for (if this stops raising, drop the check).
    tconfig = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                                normalization="RMSNorm", tensor_model_parallel_size=2,
                                sequence_parallel=True)
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(config=tconfig, hidden_size=8)
    tp2 = load_config(None, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                             "model.transformer_impl=local"])
    with pytest.raises(ConfigError, match="parallel.sequence_parallel.*transformer-engine"):
        check_sequence_parallel_norms(tp2)
    check_sequence_parallel_norms(load_config(None, ["model.transformer_impl=local"]))


@pytest.mark.parametrize("impl", ["auto", "transformer_engine"])
def test_train_and_eval_refuse_the_transformer_engine_spec_before_starting(monkeypatch, impl):
    """A config that may build transformer-engine's spec (auto does wherever TE imports: a GPU
    machine with vp2o[te]) is refused by vp2o train/eval at once, on every machine (a config
    checked on a laptop must not fail on the cluster); the rollout used to raise at its first
    batch, after the model was built and a 30B checkpoint loaded. vp2o sft accepts it."""
    from vp2o import evaluate as evaluate_module
    from vp2o import session as session_module
    from vp2o import train as train_module

    started = []
    monkeypatch.setattr(session_module.parallel, "initialize", lambda cfg: started.append(cfg))
    cfg = load_config(None, [f"model.transformer_impl={impl}"], loop="sft")
    message = rf"model.transformer_impl = '{impl}': expected local for vp2o train/eval"
    for run in (train_module.train, evaluate_module.run_eval):
        with pytest.raises(ConfigError, match=message):
            run(cfg)
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.transformer_impl={impl}"], loop="eval")
    assert started == []
    load_config(None, [], loop="train")  # the default is local


@pytest.mark.parametrize("release", [False, True], ids=["megatron-as-is", "released"])
def test_a_model_after_a_backward_is_freed_only_once_released(init_parallel, monkeypatch,
                                                              release):
    """Megatron's token dispatcher keeps the last forward's routing probabilities with their
    graph; with megatron DDP's hooks on the gradient accumulators that is a reference cycle the
    garbage collector cannot see, so the model, its DDP and the process groups they hold outlive
    their last reference (the first case, the hook replaced by a no-op, shows megatron's
    behaviour: should a megatron release break the cycle itself, that case fails and the hook
    can go). ``drop_dispatcher_probs``, the forward hook ``build_model`` puts on every MoE
    layer, breaks it."""
    import gc
    import weakref

    from megatron.core.transformer.moe.moe_layer import MoELayer

    from vp2o.mcore import training

    if not release:
        monkeypatch.setattr(mdl, "drop_dispatcher_probs", lambda layer, args, output: None)
    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=64",
                             "model.moe_ffn_hidden_size=32", "optimizer.name=sgd",
                             "parallel.use_distributed_optimizer=false"])
    init_parallel(cfg)
    model = mdl.build_model(cfg)
    ddp = training.wrap_ddp(model, cfg)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    ddp(tokens, pos, None, labels=tokens).float().mean().backward()
    stashed = [m.token_dispatcher.probs for m in model.modules() if isinstance(m, MoELayer)]
    assert len(stashed) == 1  # one MoE layer
    if release:
        assert stashed == [None]  # the hook dropped its dispatcher's probs
    else:
        assert stashed[0].grad_fn is not None  # megatron keeps them, with their graph
    del stashed
    ref = weakref.ref(model)
    del model, ddp
    gc.collect()
    assert (ref() is None) == release


_ROUNDS_OF_A_PROCESS = """
import os, sys, torch
from vp2o.config import load_config
from vp2o.mcore import model as mdl, parallel, training
if sys.argv[1] == "megatron-as-is":
    parallel._drop_stale_groups = lambda: None
cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=64",
                         "model.moe_ffn_hidden_size=32", "optimizer.name=sgd",
                         "parallel.use_distributed_optimizer=false"])
for _ in range(3):
    parallel.initialize(cfg, seed=0)
    model = mdl.build_model(cfg)
    ddp = training.wrap_ddp(model, cfg)
    tokens = torch.randint(0, 256, (2, 12))
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    ddp(tokens, pos, None, labels=tokens).float().mean().backward()
    del model, ddp
    parallel.destroy()
    names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
    print(sum(name.startswith(("pt_gloo", "gloo")) for name in names), flush=True)
"""


@pytest.mark.parametrize("case", ["megatron-as-is", "released"])
def test_destroy_frees_the_process_groups_megatron_still_references(case):
    """Each live gloo group holds a polling thread and two work threads. After megatron's
    ``destroy_model_parallel``, its ``parallel_state`` still holds the partial data-parallel
    groups and the rotary embedding's ``lru_cache`` holds released models' rotary modules with
    their context-parallel group, so every initialise/destroy round of a process leaves threads
    behind (the first case: should megatron stop doing that, it fails and
    ``parallel._drop_stale_groups`` can go). ``parallel.destroy`` drops them: no gloo thread
    outlives a round. A fresh process, as the test session keeps its own groups."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _ROUNDS_OF_A_PROCESS, case], text=True,
                          capture_output=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    gloo_threads = [int(line) for line in done.stdout.split()]
    assert len(gloo_threads) == 3
    if case == "released":
        assert gloo_threads == [0, 0, 0]
    else:
        assert gloo_threads[0] < gloo_threads[1] < gloo_threads[2], gloo_threads
