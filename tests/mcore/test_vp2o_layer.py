"""The VP2O MoE layer on real megatron-core (one process): losses, statistics, prototypes."""

from __future__ import annotations

import pytest
import torch

from vp2o.algo import specialization
from vp2o.config import load_config
from vp2o.mcore import model as mdl
from vp2o.mcore import training, vp2o_moe
from vp2o.mcore.stein_step import SteinTransform, local_expert_weights

S, B = 12, 2


def _build(init_parallel, *overrides):
    cfg = load_config(
        None,
        [
            "algorithm=vp2o", "model.hidden_size=64", "model.moe_ffn_hidden_size=32",
            "model.num_layers=2", "optimizer.name=sgd", "optimizer.lr=0.5",
            "optimizer.clip_grad=0.0", "optimizer.weight_decay=0.0",
            "parallel.use_distributed_optimizer=false", *overrides,
        ],
    )
    groups = init_parallel(cfg)
    torch.manual_seed(0)
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    return cfg, groups, model


def _inputs(cfg):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S), generator=gen)
    pos = torch.arange(S).unsqueeze(0).expand(B, -1)
    return tokens, pos


def _capture_moe_inputs(model):
    captured = {}
    for layer in vp2o_moe.moe_layers(model):
        layer.register_forward_pre_hook(
            lambda mod, args: captured.__setitem__(mod.layer_number, args[0].detach().clone())
        )
    return captured


def _aux_losses_only(model, cfg):
    """Forward + backward of a zero main loss: only the attached auxiliary losses give grads."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    clear_aux_losses_tracker()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    tokens, pos = _inputs(cfg)
    model.zero_grad()
    logits = model(tokens, pos, None)
    (logits.sum() * 0.0).backward()
    return get_moe_layer_wise_logging_tracker()


def _reference_routing(layer, h):
    """Independent top-k routing (softmax over the selected logits = renormalised gates)."""
    logits = h @ layer.router.weight.t()  # [T, E]
    top, ids = torch.topk(logits, layer.router.topk, dim=-1)
    ids, order = torch.sort(ids, dim=-1)
    return logits, ids, torch.softmax(torch.gather(top, 1, order), dim=-1)


@pytest.mark.parametrize("normalize", [False, True], ids=["method", "scale_free"])
def test_orthogonality_loss_value_and_gradient_path(init_parallel, normalize):
    cfg, _, model = _build(init_parallel)
    vp2o_moe.configure_losses(model, ortho_coeff=1.0, variance_coeff=0.0,
                              ortho_normalize=normalize)
    captured = _capture_moe_inputs(model)
    tracker = _aux_losses_only(model, cfg)
    values = tracker["expert_orthogonality_loss"]["values"]
    for layer in vp2o_moe.moe_layers(model):
        h = captured[layer.layer_number].reshape(-1, cfg.model.hidden_size)  # [T, d], row s*B+b
        _, ids, _ = _reference_routing(layer, h)
        with torch.no_grad():
            experts = layer.experts.local_experts
            ones = torch.ones(1)
            # x~_{t,j}: expert j applied to token t alone, gate 1 (raw output, method §9).
            X = torch.stack([
                torch.stack([experts[j](h[t : t + 1], ones)[0][0] for j in ids[t].tolist()])
                for t in range(h.shape[0])
            ])  # [T, k, d]
        want = specialization.orthogonality_loss(X, normalize=normalize)
        got = values[layer.layer_number - 1]
        assert got == pytest.approx(want.item(), rel=1e-4)
        # The loss reaches the experts' weights, not the router (y / g cancels the gate).
        fc1, fc2 = local_expert_weights(layer)
        expert_grad = max(float(w.grad.abs().max()) for w in fc1 + fc2 if w.grad is not None)
        assert expert_grad > 0
        # Through y / g the two gate paths cancel exactly in real arithmetic; what is left is the
        # float32 residue of that cancellation (~1e-2 of the expert gradients here; a detached
        # or missing division leaves router gradients of the experts' order or larger).
        router_grad = layer.router.weight.grad
        assert router_grad is None or float(router_grad.abs().max()) < 2e-2 * expert_grad
    # The last layer's experts receive only their own loss: their gradients equal autograd of the
    # per-token reference (checks the backward through the token-order reconstruction).
    with torch.enable_grad():
        X = torch.stack([
            torch.stack([experts[j](h[t : t + 1], ones)[0][0] for j in ids[t].tolist()])
            for t in range(h.shape[0])
        ])
        ref = specialization.orthogonality_loss(X, normalize=normalize)
        params = [w for w in fc1 + fc2]
        want_grads = torch.autograd.grad(ref, params, allow_unused=True)
    for w, g in zip(params, want_grads, strict=True):
        g = torch.zeros_like(w) if g is None else g
        got = torch.zeros_like(w) if w.grad is None else w.grad
        torch.testing.assert_close(got, g, rtol=1e-3, atol=1e-6 * expert_grad)


def test_routing_variance_loss_value_and_router_gradient(init_parallel):
    cfg, _, model = _build(init_parallel)
    vp2o_moe.configure_losses(model, ortho_coeff=0.0, variance_coeff=1.0)
    captured = _capture_moe_inputs(model)
    tracker = _aux_losses_only(model, cfg)
    values = tracker["routing_variance_loss"]["values"]
    for layer in vp2o_moe.moe_layers(model):
        h = captured[layer.layer_number].reshape(-1, cfg.model.hidden_size)
        w = layer.router.weight.detach().clone().requires_grad_(True)
        logits = h @ w.t()
        top, ids = torch.topk(logits, layer.router.topk, dim=-1)
        scores = torch.zeros_like(logits).scatter(1, ids, torch.softmax(top, dim=-1))  # [T, E]
        want = specialization.routing_variance_loss(scores)
        want.backward()
        assert values[layer.layer_number - 1] == pytest.approx(want.item(), rel=1e-5)
        assert layer.router.weight.grad.abs().sum() > 0
        if layer is vp2o_moe.moe_layers(model)[-1]:
            # Earlier routers also receive later layers' variance losses through the hidden
            # states; the last one receives only its own, which autograd of L_v must give.
            torch.testing.assert_close(layer.router.weight.grad, w.grad, rtol=1e-4, atol=1e-9)
            # ... and the loss does not reach that layer's experts.
            fc1, fc2 = local_expert_weights(layer)
            assert all(p.grad is None or not p.grad.any() for p in fc1 + fc2)


def _train_step(model, cfg, transform, recompute_calls=None):
    ddp = training.wrap_ddp(model, cfg)
    opt = training.build_optimizer(ddp, cfg)
    tokens, pos = _inputs(cfg)

    def loss_fn(m, mb):
        per_token = m(mb["tokens"], mb["pos"], None, labels=mb["labels"])
        return per_token.float().mean() / 2, {}

    labels = torch.roll(tokens, -1, 1)
    mbs = [
        {"tokens": tokens[i : i + 1], "pos": pos[i : i + 1], "labels": labels[i : i + 1]}
        for i in range(2)
    ]
    training.zero_grads(ddp, opt)
    hook = transform.before_grad_reduction
    training.forward_backward(ddp, mbs, loss_fn, before_grad_reduction=hook)
    opt.step()
    return ddp, opt


def test_coactivation_not_doubled_with_activation_recompute(init_parallel):
    cfg, groups, model = _build(init_parallel, "model.recompute=full")
    calls = []
    for layer in vp2o_moe.moe_layers(model):
        layer.router.register_forward_hook(
            lambda mod, inp, out: calls.append((mod.layer_number, out[1].clone()))
        )
    transform = SteinTransform(model, cfg.vp2o, groups, num_experts=8, seed=0)
    _train_step(model, cfg, transform)
    for li, layer in enumerate(transform.layers):
        maps = [m for n, m in calls if n == layer.layer_number]
        assert len(maps) == 4, "2 micro-batches, each routed again by the recompute"
        # Each micro-batch's recompute repeats its forward exactly: count each once.
        assert torch.equal(maps[0], maps[1]) or torch.equal(maps[0], maps[2])
        distinct = [maps[0], maps[1] if not torch.equal(maps[0], maps[1]) else maps[2]]
        r = torch.cat(distinct).float()
        torch.testing.assert_close(transform.coactivation[li], r.t() @ r / r.shape[0])


def test_prototypes_equal_svd_after_init_and_after_a_step(init_parallel):
    cfg, groups, model = _build(init_parallel)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # planted dominant direction: a clear spectral gap
        for layer in vp2o_moe.moe_layers(model):
            for w in local_expert_weights(layer)[1]:
                a = torch.randn(w.shape[0], generator=gen)
                b = torch.randn(w.shape[1], generator=gen)
                w.copy_(torch.outer(a, b) / (a.norm() * b.norm()) * 3.0
                        + 0.02 * torch.randn(w.shape, generator=gen))

    def check(transform):
        for li, layer in enumerate(transform.layers):
            for j, w in enumerate(local_expert_weights(layer)[1]):
                top = torch.linalg.svd(w.detach().double())[0][:, 0].float()
                u = transform.prototypes[li, j]
                sign = torch.sign(u @ top)
                torch.testing.assert_close(u, sign * top, rtol=0, atol=1e-4)

    transform = SteinTransform(model, cfg.vp2o, groups, num_experts=8, seed=0)
    check(transform)
    before = [w.detach().clone() for w in local_expert_weights(transform.layers[0])[1]]
    _train_step(model, cfg, transform)
    transform.after_optimizer_step()
    after = local_expert_weights(transform.layers[0])[1]
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True))
    check(transform)


def test_router_replay_reuses_recorded_experts(init_parallel):
    from vp2o.mcore import router_replay

    cfg, _, model = _build(init_parallel, "model.moe_enable_routing_replay=true")
    tokens, pos = _inputs(cfg)
    layers = vp2o_moe.moe_layers(model)
    with torch.no_grad():
        router_replay.record(model)
        model(tokens, pos, None)
        ids = router_replay.recorded(model)
        actor = [layer.router.last_routing.ids for layer in layers]
        for layer in layers:  # a different learner: its own top-k would differ
            layer.router.weight.add_(torch.randn_like(layer.router.weight))
        router_replay.stop(model)
        model(tokens, pos, None)
        assert any(
            not torch.equal(a, layer.router.last_routing.ids)
            for a, layer in zip(actor, layers, strict=True)
        )
        router_replay.replay(model, ids)
        model(tokens, pos, None)
    for a, layer in zip(actor, layers, strict=True):
        assert torch.equal(layer.router.last_routing.ids, a)
    with pytest.raises(ValueError, match="routing for 1 MoE layers"):
        router_replay.replay(model, ids[:1])


@pytest.mark.parametrize(
    ("chunk", "layout"),
    [
        (None, "grad-view"),
        (3 * 8 * 32 + 5, "grad-view"),
        (None, "grad-and-param-view"),
        (3 * 8 * 32 + 5, "stacked"),
        (None, "median-tau"),
    ],
    ids=["default", "small-unaligned", "distributed-optimizer", "stacked-small-unaligned",
         "median-tau"],
)
def test_transform_in_the_step_equals_the_pure_transport(init_parallel, monkeypatch, chunk,
                                                         layout):
    """The expert main_grads after the in-step transform equal ``stein.transport`` (§6-8) applied
    to the same gradients, prototypes and C; the small chunk budget splits every expert matrix
    over several column chunks (fc2's rounded to whole rows, where the repulsion is added).

    Layouts: the grads read and written through strided views of megatron's grad buffer (its
    experts sit in reverse order, so A's rows and columns are permuted), with the distributed
    optimizer the fc2 weights through a view of its param buffer too, and the stacked fallback.
    """
    from vp2o.algo import stein
    from vp2o.mcore import stein_step

    overrides = ["vp2o.alpha=0.5"]
    if chunk is not None:
        overrides.append(f"vp2o.transform_chunk_elems={chunk}")
    if layout == "grad-and-param-view":
        overrides += ["parallel.use_distributed_optimizer=true", "optimizer.name=adam"]
    if layout == "stacked":
        monkeypatch.setattr(stein_step, "expert_bank_view", lambda tensors: None)
    if layout == "median-tau":  # a per-layer temperature through the batched geometry
        overrides.append("vp2o.tau_mode=median")
    cfg, groups, model = _build(init_parallel, *overrides)
    transform = SteinTransform(model, cfg.vp2o, groups, num_experts=8, seed=0)
    captured = []

    def capture(ddp):
        grads = []
        for layer in transform.layers:
            fc1, fc2 = local_expert_weights(layer)
            grads.append([torch.stack([w.main_grad.clone() for w in ws]) for ws in (fc1, fc2)])
        out = transform.before_grad_reduction(ddp)
        captured.append((grads, transform.coactivation.clone()))
        return out

    prototypes = transform.prototypes.clone()
    ddp = training.wrap_ddp(model, cfg)
    tokens, pos = _inputs(cfg)

    def loss_fn(m, mb):
        return m(mb["tokens"], mb["pos"], None, labels=mb["labels"]).float().mean(), {}

    fc2_weights = local_expert_weights(transform.layers[0])[1]
    grad_bank = stein_step.expert_bank_view([w.main_grad for w in fc2_weights])
    param_bank = stein_step.expert_bank_view([w.detach() for w in fc2_weights])
    assert (grad_bank is None) == (layout == "stacked")  # "median-tau" reads the grad view
    assert (param_bank is None) == (layout != "grad-and-param-view")
    checked = 0
    # Two steps on different batches: the second reuses the layouts read by the first.
    for step, batch in enumerate((tokens, torch.flip(tokens, (1,)))):
        ddp.zero_grad_buffer()
        transform.reset_statistics()
        mbs = [{"tokens": batch, "pos": pos, "labels": torch.roll(batch, -1, 1)}]
        training.forward_backward(ddp, mbs, loss_fn, before_grad_reduction=capture)
        grads, coactivation = captured[step]
        for li, layer in enumerate(transform.layers):
            g1, g2 = grads[li]
            fc1, fc2 = local_expert_weights(layer)
            w2 = torch.stack([w.detach() for w in fc2])
            want, _ = stein.transport(
                [g1, g2], w2, prototypes[li], coactivation[li], w2_index=1,
                tau=(stein.median_temperature(prototypes[li], tau0=cfg.vp2o.tau0)
                     if layout == "median-tau" else stein.temperature(8, cfg.vp2o.tau0)),
                alpha=cfg.vp2o.alpha,
                top_m=cfg.vp2o.top_m(layer.router.topk), min_frac=cfg.vp2o.coactive_min_frac,
                iters=cfg.vp2o.power_iters,
            )
            for ws, ref, raw in zip((fc1, fc2), want, (g1, g2), strict=True):
                got = torch.stack([w.main_grad for w in ws])
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
                checked += int(not torch.allclose(ref, raw))
    assert not torch.equal(captured[0][0][0][0], captured[1][0][0][0])  # two different steps
    assert checked >= 4  # the transform changed the gradients (not a pass-through)
    # The refresh reads fc2 through the same layouts: equal to the refresh of the stacked weights.
    transform.after_optimizer_step()
    for li, layer in enumerate(transform.layers):
        w2 = torch.stack([w.detach() for w in local_expert_weights(layer)[1]])
        want = stein.refresh_prototypes(w2, prototypes[li], iters=cfg.vp2o.power_iters)
        torch.testing.assert_close(transform.prototypes[li], want, rtol=0, atol=1e-6)


def test_expert_bank_view_layouts():
    """Uniform stride in one storage: a writable view in address order; anything else: None."""
    from vp2o.mcore.stein_step import expert_bank_view

    flat = torch.arange(40.0)
    tensors = [flat[30 - 10 * i : 36 - 10 * i].view(2, 3) for i in range(4)]  # reverse order
    view, order = expert_bank_view(tensors)
    assert order == (3, 2, 1, 0)
    for k, i in enumerate(order):
        assert torch.equal(view[k], tensors[i])
    view[0].fill_(-1.0)  # writes reach the tensors
    assert torch.equal(tensors[3], torch.full((2, 3), -1.0))
    uneven = [flat[0:6].view(2, 3), flat[10:16].view(2, 3), flat[24:30].view(2, 3)]
    assert expert_bank_view(uneven) is None
    overlapping = [flat[0:6].view(2, 3), flat[3:9].view(2, 3)]
    assert expert_bank_view(overlapping) is None
    separate = [torch.zeros(2, 3), torch.zeros(2, 3)]
    assert expert_bank_view(separate) is None


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
def test_router_statistics_against_reference(init_parallel, padded):
    """C, the routed-token count and the entropy sum of one grad-enabled routing against a plain
    recomputation: softmax entropy of each real token's logits; padding tokens count nowhere."""
    cfg, _, model = _build(init_parallel)
    router = vp2o_moe.moe_layers(model)[0].router
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(S, B, cfg.model.hidden_size, generator=gen)  # [S, B, d]
    pad = torch.zeros(S, B, dtype=torch.bool)
    if padded:
        pad[-3:, 0] = True  # the last 3 positions of sequence 0
    router.reset_step_statistics()
    with torch.enable_grad():
        router(h, padding_mask=pad if padded else None)  # [S, B], as MoELayer passes it
    logits = h.reshape(-1, cfg.model.hidden_size) @ router.weight.detach().t()  # [T, E], s*B+b
    keep = ~pad.reshape(-1)
    p = torch.softmax(logits[keep].double(), -1)
    entropy = -(p * p.log()).sum(-1)
    assert float(router.routed_tokens) == int(keep.sum())
    assert float(router.entropy_sum) == pytest.approx(float(entropy.sum()), rel=1e-5)
    ids = torch.topk(logits[keep], router.topk, dim=-1).indices
    r = torch.zeros(int(keep.sum()), logits.shape[1]).scatter_(1, ids, 1.0)
    torch.testing.assert_close(router.coactivation_counts, r.t() @ r)


def test_layout_cache_is_read_again_when_the_tensors_move(init_parallel):
    """The transform reads each layer's expert layout once; tensors at another address (a
    reallocated buffer) are read again instead of going through a stale view."""
    cfg, groups, model = _build(init_parallel)
    transform = SteinTransform(model, cfg.vp2o, groups, num_experts=8, seed=0)
    a, b = torch.zeros(8 * 6), torch.zeros(8 * 6)
    first = [a[6 * (7 - i) : 6 * (8 - i)] for i in range(8)]  # reverse order, like megatron's
    moved = [b[6 * i : 6 * (i + 1)] for i in range(8)]
    def same(t):
        return t

    bank = transform._bank(0, "fc1.grad", first, same)
    assert transform._bank(0, "fc1.grad", first, same) is bank
    assert bank.order == tuple(range(7, -1, -1))
    again = transform._bank(0, "fc1.grad", moved, same)
    assert again is not bank and again.order == tuple(range(8))
    again.view[3].fill_(1.0)
    assert torch.equal(moved[3], torch.ones(6)) and not a.any()


def test_token_major_layout_matches_megatrons_permutation(init_parallel):
    """`token_major_layout` on megatron's own permutation of one forward (the dispatcher's
    token-of-row mapping, top-k = 3) against plain loops over the routing map."""
    cfg, _, model = _build(init_parallel, "model.moe_router_topk=3")
    layer = vp2o_moe.moe_layers(model)[0]
    tokens, pos = _inputs(cfg)
    with torch.no_grad():
        model(tokens, pos, None)
    disp = layer.token_dispatcher
    routing_map = disp.routing_map  # [T, E]
    token_of_row = disp.reversed_local_input_permutation_mapping  # [T*k], megatron's rows
    ids, order, dest = vp2o_moe.token_major_layout(token_of_row, routing_map.sum(0), 3)
    want_ids = [[e for e in range(routing_map.shape[1]) if routing_map[t, e]]
                for t in range(routing_map.shape[0])]
    assert ids.tolist() == want_ids
    assert torch.equal(order[dest], torch.arange(order.numel()))  # dest is the inverse
    # Row r of megatron's layout is (token, expert) with experts ascending, tokens ascending
    # within an expert; the p-th token-major entry is (token, expert) the other way round.
    rows = [(t, e) for e in range(routing_map.shape[1]) for t in range(routing_map.shape[0])
            if routing_map[t, e]]
    walk = [(t, e) for t in range(routing_map.shape[0]) for e in range(routing_map.shape[1])
            if routing_map[t, e]]
    assert [rows[r] for r in order.tolist()] == walk
    assert [t for t, _ in rows] == token_of_row.tolist()


def test_specialisation_losses_with_padding_equal_the_losses_of_the_real_tokens(init_parallel):
    """With a padding mask the orthogonality and routing-variance losses (masks, not selections)
    equal those of a forward over the real tokens alone, and so do their gradients to the
    layer's input; padding tokens get none."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    cfg, _, model = _build(init_parallel)
    vp2o_moe.configure_losses(model, ortho_coeff=1.0, variance_coeff=1.0)
    layer = vp2o_moe.moe_layers(model)[0]
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(S, B, cfg.model.hidden_size, generator=gen)  # [S, B, d]
    pad = torch.zeros(B, S, dtype=torch.bool)  # [B, S], True = padding, as the model passes it
    pad[0, -4:] = True
    pad[1, :2] = True
    real = ~pad.t().reshape(-1)  # [S*B], row s*B + b

    def losses(x, padding_mask):
        clear_aux_losses_tracker()
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
        leaf = x.clone().requires_grad_(True)
        with torch.enable_grad():
            out, _ = layer(leaf, padding_mask=padding_mask)
            (out.sum() * 0.0).backward()  # only the attached losses give gradients
        tracker = get_moe_layer_wise_logging_tracker()
        names = ("expert_orthogonality_loss", "routing_variance_loss")
        return [float(tracker[n]["values"][layer.layer_number - 1]) for n in names], leaf.grad

    padded, grad_padded = losses(h, pad)
    alone, grad_alone = losses(h.reshape(S * B, 1, -1)[real], None)  # real tokens only
    assert padded == pytest.approx(alone, rel=1e-5)
    grad_padded = grad_padded.reshape(S * B, -1)
    torch.testing.assert_close(grad_padded[real], grad_alone.reshape(int(real.sum()), -1),
                               rtol=1e-4, atol=1e-7)
    assert float(grad_padded[~real].abs().max()) == 0.0
    assert float(grad_alone.abs().max()) > 0


def test_vp2o_layers_add_no_host_synchronising_ops(init_parallel):
    """A training forward + backward with padding and both losses runs no more ops that wait
    for the device (data-dependent shapes, scalar reads) than megatron's own MoE layers on the
    same batch: counted on the CPU with the profiler (on GPUs each would stall the host)."""
    from vp2o.syncs import host_sync_ops

    cfg, _, vp2o_model = _build(init_parallel)
    vp2o_moe.configure_losses(vp2o_model, ortho_coeff=1.0, variance_coeff=1.0)
    tokens, pos = _inputs(cfg)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -3:] = True

    def count(model) -> dict[str, int]:
        model.train()
        return host_sync_ops(lambda: model(
            tokens, pos, None, labels=tokens, padding_mask=pad).sum().backward())

    torch.manual_seed(0)
    plain, ours = count(mdl.build_model(cfg)), count(vp2o_model)
    assert plain  # megatron's own dispatcher syncs: the counter sees what it should
    assert ours == plain, f"VP2O layers add host syncs: {ours} vs megatron's {plain}"


def test_step_losses_are_the_mean_over_layers_and_micro_batches_and_never_leak(init_parallel):
    """`specialisation_losses` reports each §9 loss as the mean over MoE layers and
    micro-batches of what the layers saved (an explicit loop over the tracker's per-layer
    values as reference) and removes the entries; `drop_specialisation_losses` removes what a
    forward outside a step left, so the next step reports its own forwards only."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_moe_layer_wise_logging_tracker,
    )

    from vp2o.learner import drop_specialisation_losses, specialisation_losses

    cfg, _, model = _build(init_parallel)
    vp2o_moe.configure_losses(model, ortho_coeff=1.0, variance_coeff=1.0)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    tokens, pos = _inputs(cfg)
    names = {"expert_orthogonality_loss": "loss/orthogonality",
             "routing_variance_loss": "loss/routing_variance"}

    def forward(rows):
        with torch.enable_grad():
            model(tokens[rows], pos[rows], None).sum().backward()

    def per_layer():
        tracker = get_moe_layer_wise_logging_tracker()
        return {key: [float(v) for v in tracker[name]["values"]] for name, key in names.items()}

    drop_specialisation_losses()
    forward(slice(0, 1))  # a forward outside any step (evaluation, an earlier run)
    drop_specialisation_losses()
    assert not set(names) & set(get_moe_layer_wise_logging_tracker())

    forward(slice(0, 1))  # the step's two micro-batches
    first = per_layer()
    forward(slice(1, 2))
    both = per_layer()
    got = {k: float(v) for k, v in specialisation_losses(2).items()}
    assert set(got) == set(names.values())
    for key, values in both.items():
        layers = [v for v in values if v != 0.0]
        assert len(layers) == cfg.model.num_layers
        assert got[key] == pytest.approx(sum(layers) / len(layers) / 2, rel=1e-6)
        assert abs(sum(values)) > abs(sum(first[key])) > 0  # the tracker adds them up
    assert not set(names) & set(get_moe_layer_wise_logging_tracker())
    assert specialisation_losses(1) == {}  # nothing saved since: nothing reported


@pytest.mark.parametrize("pre_softmax", [False, True], ids=["renormalised", "pre_softmax"])
def test_gates_at_given_ids_equal_the_softmax_reference_and_leave_replay_alone(init_parallel,
                                                                            pre_softmax):
    """``VP2ORouter.gates_at``: the gates at arbitrary expert ids (not the router's own top-k)
    equal an explicit softmax (over all experts with ``moe_router_pre_softmax``, else over the
    chosen logits), in the order of ``ids``; megatron's process-wide list of router replays
    (addressed by position) is the same length after."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    cfg, _, model = _build(init_parallel,
                           f"model.moe_router_pre_softmax={str(pre_softmax).lower()}",
                           "model.moe_enable_routing_replay=true")
    router = vp2o_moe.moe_layers(model)[0].router
    gen = torch.Generator().manual_seed(5)
    T, E, k = 10, cfg.model.num_experts, router.topk
    logits = torch.randn(T, E, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])  # any order
    before = len(RouterReplay.global_router_replay_instances)
    gates = router.gates_at(logits, ids)
    assert len(RouterReplay.global_router_replay_instances) == before
    chosen = logits.gather(1, ids)
    want = (torch.softmax(logits, -1).gather(1, ids) if pre_softmax
            else torch.softmax(chosen, -1))
    torch.testing.assert_close(gates, want, rtol=1e-6, atol=1e-7)


def test_layer_output_and_gradients_equal_megatrons_combine_with_the_orthogonality_loss(
    init_parallel, monkeypatch
):
    """With the orthogonality loss on, the layer sums each token's token-major rows itself
    instead of megatron's unpermute (a scatter-add): the logits and every parameter's gradient
    of a real loss equal those of megatron's own combine."""
    cfg, _, model = _build(init_parallel)
    vp2o_moe.configure_losses(model, ortho_coeff=0.5, variance_coeff=0.0)
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    tokens, pos = _inputs(cfg)
    weights = torch.randn(B, S, cfg.model.vocab_size, generator=torch.Generator().manual_seed(5))

    def run():
        model.zero_grad()
        logits = model(tokens, pos, None)
        (logits * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    calls = []
    own = vp2o_moe.VP2OMoELayer._sums_rows_itself
    monkeypatch.setattr(
        vp2o_moe.VP2OMoELayer, "_sums_rows_itself",
        lambda self: calls.append(1) or own(self),
    )
    got_logits, got = run()
    assert calls and own(vp2o_moe.moe_layers(model)[0])  # the own sum ran
    monkeypatch.setattr(vp2o_moe.VP2OMoELayer, "_sums_rows_itself", lambda self: False)
    want_logits, want = run()
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys()
    assert any("experts" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
