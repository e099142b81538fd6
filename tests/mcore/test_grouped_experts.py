"""vp2o's GroupedExperts (model.moe_grouped_gemm = true on the local spec) against megatron's
SequentialMLP: the same function and gradients, the same Stein transform, interchangeable
checkpoints (one process; megatron-core for real)."""

from __future__ import annotations

import pytest
import torch

from vp2o.config import load_config
from vp2o.mcore import model as mdl
from vp2o.mcore import training, vp2o_moe
from vp2o.mcore.expert_layout import ExpertSlice, local_expert_weights
from vp2o.mcore.grouped_experts import GroupedExperts
from vp2o.mcore.stein_step import SteinTransform

S, B = 12, 2
BASE = [
    "algorithm=vp2o", "model.hidden_size=64", "model.moe_ffn_hidden_size=32",
    "model.num_layers=2", "model.num_experts=8", "optimizer.clip_grad=0.0",
    "optimizer.weight_decay=0.0", "vp2o.alpha=0.5",
]


def _cfg(grouped: bool, *overrides):
    return load_config(None, [*BASE, f"model.moe_grouped_gemm={str(grouped).lower()}",
                              *overrides])


def _build(cfg):
    torch.manual_seed(0)
    return mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))


def _copy_weights(src, dst) -> None:
    """Every parameter of ``src`` into ``dst``; experts matched through the expert layout."""
    with torch.no_grad():
        src_params = dict(src.named_parameters())
        for name, p in dst.named_parameters():
            if ".mlp.experts." not in name:
                p.copy_(src_params[name])
        for a, b in zip(vp2o_moe.moe_layers(src), vp2o_moe.moe_layers(dst), strict=True):
            for ha, hb in zip(sum(local_expert_weights(a), []), sum(local_expert_weights(b), []),
                              strict=True):
                hb.detach().copy_(ha.detach())


def _pair(init_parallel, *overrides):
    seq_cfg, grp_cfg = _cfg(False, *overrides), _cfg(True, *overrides)
    groups = init_parallel(seq_cfg)
    seq, grp = _build(seq_cfg), _build(grp_cfg)
    _copy_weights(seq, grp)
    return groups, (seq_cfg, seq), (grp_cfg, grp)


def _inputs(cfg, flip=False):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S), generator=gen)
    if flip:
        tokens = torch.flip(tokens, (1,))
    return tokens, torch.arange(S).unsqueeze(0).expand(B, -1)


def test_grouped_experts_built_and_refusals(init_parallel):
    _, (_, seq), (_, grp) = _pair(init_parallel)
    layer = vp2o_moe.moe_layers(grp)[0]
    assert isinstance(layer.experts, GroupedExperts)
    assert not isinstance(vp2o_moe.moe_layers(seq)[0].experts, GroupedExperts)
    fc1, fc2 = local_expert_weights(layer)
    assert all(isinstance(h, ExpertSlice) for h in fc1 + fc2) and len(fc1) == 8
    assert fc1[0].shape == (64, 64) and fc2[0].shape == (64, 32)  # [2f, d], [d, f]
    assert all(p.allreduce is False for n, p in grp.named_parameters() if ".experts." in n)
    bad = _cfg(True, "model.moe_ffn_hidden_size=30")
    with pytest.raises(ValueError, match=r"model.moe_ffn_hidden_size = 30 \(torch._grouped_mm "
                                         r"needs a multiple of 4"):
        mdl.build_model(bad)


def test_grouped_experts_equal_sequential_mlp(init_parallel):
    """Forward, input and gate gradients, and weight gradients of one layer's experts, on a
    dispatch with an empty expert; the upstream gradient of ``.sum()`` (stride 0) included."""
    _, (_, seq), (_, grp) = _pair(init_parallel)
    a, b = vp2o_moe.moe_layers(seq)[0].experts, vp2o_moe.moe_layers(grp)[0].experts
    gen = torch.Generator().manual_seed(5)
    counts = torch.tensor([3, 0, 5, 1, 2, 4, 0, 6])
    x0 = torch.randn(int(counts.sum()), 64, generator=gen)
    p0 = torch.rand(x0.shape[0], generator=gen)
    outs = []
    for experts in (a, b):
        x, p = x0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        y, bias = experts(x, counts, p)
        assert bias is None
        (y.sum() + (y * y).sum()).backward()
        fc1, fc2 = local_expert_weights(vp2o_moe.moe_layers(seq if experts is a else grp)[0])
        grads = [h.grad.clone() for h in fc1 + fc2]
        outs.append((y.detach(), x.grad, p.grad, grads))
    (ya, xa, pa, ga), (yb, xb, pb, gb) = outs
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xb, xa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    for g_seq, g_grp in zip(ga, gb, strict=True):
        torch.testing.assert_close(g_grp, g_seq, rtol=1e-5, atol=1e-6)
    assert not torch.any(gb[1]) and not torch.any(gb[8 + 6])  # experts without tokens


def test_vp2o_step_on_grouped_experts_equals_sequential(init_parallel):
    """Whole-model loss, the Stein-transformed expert main_grads (§6-8), the updated weights and
    the refreshed prototypes (§4) of two steps, with both specialisation losses on."""
    groups, (seq_cfg, seq), (grp_cfg, grp) = _pair(
        init_parallel, "optimizer.name=sgd", "optimizer.lr=0.5",
        "parallel.use_distributed_optimizer=false")
    runs = []
    for cfg, model in ((seq_cfg, seq), (grp_cfg, grp)):
        vp2o_moe.configure_losses(model, ortho_coeff=0.1, variance_coeff=0.1)
        transform = SteinTransform(model, cfg.vp2o, groups, num_experts=8, seed=0)
        ddp = training.wrap_ddp(model, cfg)
        opt = training.build_optimizer(ddp, cfg)
        grads, losses = [], []

        def loss_fn(m, mb, losses=losses):
            loss = m(mb["tokens"], mb["pos"], None, labels=mb["labels"]).float().mean()
            losses.append(loss.detach())
            return loss, {}

        def after(d, transform=transform, model=model, grads=grads):
            out = transform.before_grad_reduction(d)
            grads.append([torch.stack([h.main_grad.clone() for h in hs])
                          for layer in vp2o_moe.moe_layers(model)
                          for hs in local_expert_weights(layer)])
            return out

        for flip in (False, True):
            tokens, pos = _inputs(cfg, flip)
            training.zero_grads(ddp, opt)
            mbs = [{"tokens": tokens, "pos": pos, "labels": torch.roll(tokens, -1, 1)}]
            training.forward_backward(ddp, mbs, loss_fn, before_grad_reduction=after)
            opt.step()
            transform.after_optimizer_step()
        weights = [torch.stack([h.detach().clone() for h in hs])
                   for layer in vp2o_moe.moe_layers(model) for hs in local_expert_weights(layer)]
        runs.append((losses, grads, weights, transform.prototypes.clone()))
    (la, ga, wa, ua), (lb, gb, wb, ub) = runs
    torch.testing.assert_close(torch.stack(lb), torch.stack(la), rtol=1e-5, atol=1e-6)
    for step_a, step_b in zip(ga, gb, strict=True):
        for x, y in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
    for x, y in zip(wa, wb, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ub, ua, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("direction", ["sequential->grouped", "grouped->sequential"])
def test_checkpoints_load_across_sequential_and_grouped(init_parallel, tmp_path, direction):
    """A checkpoint (weights and the distributed optimizer's Adam state) written by one expert
    module loads into the other: same keys, global shapes and values."""
    from vp2o.mcore.checkpoint import load_checkpoint, save_checkpoint

    over = ["optimizer.name=adam", "optimizer.lr=1e-2", "parallel.use_distributed_optimizer=true"]
    _, (seq_cfg, seq), (grp_cfg, grp) = _pair(init_parallel, *over)
    pairs = [(seq_cfg, seq), (grp_cfg, grp)]
    if direction == "grouped->sequential":
        pairs.reverse()
    built = []
    for cfg, model in pairs:
        ddp = training.wrap_ddp(model, cfg)
        built.append((cfg, model, ddp, training.build_optimizer(ddp, cfg)))
    (cfg, src, ddp, opt), (cfg2, dst, ddp2, opt2) = built
    tokens, pos = _inputs(cfg)
    training.zero_grads(ddp, opt)
    mbs = [{"tokens": tokens, "pos": pos, "labels": torch.roll(tokens, -1, 1)}]
    training.forward_backward(
        ddp, mbs, lambda m, mb: (m(mb["tokens"], mb["pos"], None, labels=mb["labels"]).mean(), {})
    )
    opt.step()  # weights moved, Adam state non-zero
    path = save_checkpoint(tmp_path, 1, model=ddp, optimizer=opt, scheduler=None, extra={})
    load_checkpoint(path, model=ddp2, optimizer=opt2, scheduler=None)
    for la, lb in zip(vp2o_moe.moe_layers(src), vp2o_moe.moe_layers(dst), strict=True):
        for ha, hb in zip(sum(local_expert_weights(la), []), sum(local_expert_weights(lb), []),
                          strict=True):
            assert torch.equal(ha.detach(), hb.detach())
    named = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        if ".experts." not in name:
            assert torch.equal(p, named[name]), name
    # The Adam moments followed the weights: one more identical step keeps them equal.
    for d, o in ((ddp, opt), (ddp2, opt2)):
        training.zero_grads(d, o)
        training.forward_backward(
            d, mbs, lambda m, mb: (m(mb["tokens"], mb["pos"], None, labels=mb["labels"]).mean(),
                                   {})
        )
        o.step()
    for la, lb in zip(vp2o_moe.moe_layers(src), vp2o_moe.moe_layers(dst), strict=True):
        for ha, hb in zip(sum(local_expert_weights(la), []), sum(local_expert_weights(lb), []),
                          strict=True):
            torch.testing.assert_close(hb.detach(), ha.detach(), rtol=1e-5, atol=1e-6)


def test_engine_weight_stream_is_the_same_for_grouped_experts(init_parallel):
    """The vLLM weight sync (engine_weights.hf_named_tensors) streams GroupedExperts' stacked
    weights per expert under the HF names, the same tensors as from SequentialMLP."""
    from vp2o.convert.engine_weights import hf_named_tensors

    _, (seq_cfg, seq), (grp_cfg, grp) = _pair(init_parallel)
    want = dict(hf_named_tensors(seq, seq_cfg.model))
    got = dict(hf_named_tensors(grp, grp_cfg.model))
    assert got.keys() == want.keys()
    assert any(".experts.7." in k for k in got)  # every expert, per expert
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
