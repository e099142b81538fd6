"""Single-GPU correctness checks of the megatron integration (run by benchmarks/gpu_check.sh).

    python benchmarks/gpu_checks.py            # also runs on a CPU (small sizes), for rehearsal

Checks, in fp32 and with bf16 parameters (fp32 main grads):
  1. ``vp2o.mcore.cpu.install()`` is a no-op with CUDA (returns False).
  2. The VP2O identity configuration (alpha=0, M_co = I, no specialisation losses) gives exactly
     megatron's plain step (gradients and parameters bit-identical).
  3. The transformed expert gradients equal ``A.G + alpha*phi_rep`` computed independently by
     ``vp2o.algo`` on the CPU in float64 from the same untransformed gradients and weights.
  4. Prototypes equal ``torch.linalg.svd`` of each expert's fc2 weight (planted spectral gap).
  5. (fp32 only) A training forward + backward with padding and both specialisation losses runs
     no more host-synchronising ops (nonzero, masked_select, item, ...: profiler-counted) in
     VP2O's layers than in megatron's own.
  6. The trust region's rollback (``optim_state.Rollback``, distributed optimizer, Adam)
     puts every parameter, main param and optimizer state tensor back bit for bit, copying no
     parameter (they are rebuilt from the main params by megatron's copy and all-gather).
Prints one line per check (``PASS``/``FAIL`` and the measured error) and exits non-zero on a
failure.
"""

from __future__ import annotations

import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> int:
    from vp2o.algo import stein
    from vp2o.config import load_config
    from vp2o.console import quiet_third_party_warnings
    from vp2o.mcore import cpu, parallel, training, vp2o_moe
    from vp2o.mcore import model as mdl
    from vp2o.mcore.stein_step import SteinTransform, local_expert_weights

    quiet_third_party_warnings()
    cuda = torch.cuda.is_available()
    # megatron's unpermute uses scatter_add, whose CUDA kernel is atomic (summation order varies
    # run to run) unless deterministic algorithms are requested: needed for bit-identity below.
    torch.use_deterministic_algorithms(True, warn_only=True)
    results = []

    def report(name, ok, detail):
        results.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    report("cpu.install() no-op with CUDA" if cuda else "cpu.install() active on CPU",
           cpu.install() is (not cuda), f"cuda={cuda}")

    size = ["model.hidden_size=256", "model.moe_ffn_hidden_size=256", "model.num_layers=2",
            "model.num_experts=8", "model.vocab_size=512"]
    base = [*size, "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.clip_grad=0.0",
            "optimizer.weight_decay=0.0", "parallel.use_distributed_optimizer=false"]
    groups = parallel.initialize(load_config(None, base))
    device = torch.device("cuda" if cuda else "cpu")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (4, 65), generator=gen).to(device)
    pos = torch.arange(64, device=device).unsqueeze(0).expand(2, -1)

    def loss_fn(m, mb):
        per_token = m(mb["t"], pos, None, labels=mb["l"])
        return per_token.float().mean() / 2, {}

    mbs = [{"t": tokens[i : i + 2, :-1], "l": tokens[i : i + 2, 1:]} for i in (0, 2)]

    def build(cfg, vp2o):
        torch.manual_seed(0)
        hook = vp2o_moe.vp2o_layer_spec_hook(cfg) if vp2o else None
        model = mdl.build_model(cfg, layer_spec_hook=hook)
        return model, training.wrap_ddp(model, cfg), None

    for dtype in ("fp32", "bf16"):
        # --- 2. identity configuration == plain megatron step ---
        cfg_plain = load_config(None, [*base, f"model.params_dtype={dtype}"])
        cfg_id = load_config(None, [*base, f"model.params_dtype={dtype}", "algorithm=vp2o",
                                    "vp2o.alpha=0", "vp2o.coactive_top_m=0",
                                    "vp2o.coactive_min_frac=2.0"])
        plain, ddp_p, _ = build(cfg_plain, False)
        ident, ddp_i, _ = build(cfg_id, True)
        ident.load_state_dict(plain.state_dict())
        opt_p = training.build_optimizer(ddp_p, cfg_plain)
        opt_i = training.build_optimizer(ddp_i, cfg_id)
        tr = SteinTransform(ident, cfg_id.vp2o, groups, num_experts=8, seed=0)
        for ddp, opt, hook in ((ddp_p, opt_p, None), (ddp_i, opt_i, tr.before_grad_reduction)):
            training.zero_grads(ddp, opt)
            training.forward_backward(ddp, mbs, loss_fn, before_grad_reduction=hook)
            opt.step()
        diff = max(float((a.float() - b.float()).abs().max())
                   for a, b in zip(plain.parameters(), ident.parameters(), strict=True))
        report(f"identity VP2O step == megatron step ({dtype})", diff == 0.0,
               "bit-identical params" if diff == 0.0 else f"max abs param difference {diff:.2e}")

        # --- 3. transformed expert gradients vs an independent float64 reference ---
        cfg = load_config(None, [*base, f"model.params_dtype={dtype}", "algorithm=vp2o",
                                 "vp2o.alpha=0.5"])
        model, ddp, _ = build(cfg, True)
        opt = training.build_optimizer(ddp, cfg)
        tr = SteinTransform(model, cfg.vp2o, groups, num_experts=8, seed=0)
        captured = {}

        def capture_then_transform(d, _tr=tr, _cap=captured):
            for li, layer in enumerate(_tr.layers):
                fc1, fc2 = local_expert_weights(layer)
                _cap[li] = ([w.main_grad.detach().double().cpu().clone() for w in fc1],
                            [w.main_grad.detach().double().cpu().clone() for w in fc2],
                            [w.detach().double().cpu().clone() for w in fc2])
            _tr.before_grad_reduction(d)

        training.zero_grads(ddp, opt)
        training.forward_backward(ddp, mbs, loss_fn, before_grad_reduction=capture_then_transform)
        worst = 0.0
        for li, layer in enumerate(tr.layers):
            g1, g2, w2 = captured[li]
            geo = tr.geometry(li, tr.coactivation[li])
            A = geo.A.double().cpu()
            u = tr.prototypes[li].double().cpu()
            phi = stein.repulsion_autograd(torch.stack(w2), u, geo.V.double().cpu(),
                                           tau=float(geo.tau), iters=cfg.vp2o.power_iters)
            want1 = torch.einsum("ji,ipq->jpq", A, torch.stack(g1))
            want2 = torch.einsum("ji,ipq->jpq", A, torch.stack(g2)) + cfg.vp2o.alpha * phi
            fc1, fc2 = local_expert_weights(layer)
            got1 = torch.stack([w.main_grad.double().cpu() for w in fc1])
            got2 = torch.stack([w.main_grad.double().cpu() for w in fc2])
            for got, want in ((got1, want1), (got2, want2)):
                worst = max(worst, float((got - want).norm() / want.norm()))
        report(f"transformed expert grads vs float64 reference ({dtype})", worst < 1e-5,
               f"max relative error {worst:.2e}")

        # --- 4. prototypes vs SVD ---
        with torch.no_grad():
            for layer in tr.layers:
                for w in local_expert_weights(layer)[1]:
                    a = torch.randn(w.shape[0], generator=gen)
                    b = torch.randn(w.shape[1], generator=gen)
                    planted = 3.0 * torch.outer(a / a.norm(), b / b.norm())
                    w.copy_((planted + 0.02 * torch.randn(w.shape, generator=gen)).to(w))
        tr = SteinTransform(model, cfg.vp2o, groups, num_experts=8, seed=0)
        err = 0.0
        for li, layer in enumerate(tr.layers):
            for j, w in enumerate(local_expert_weights(layer)[1]):
                top = torch.linalg.svd(w.detach().double().cpu())[0][:, 0]
                u = tr.prototypes[li, j].double().cpu()
                err = max(err, float((u - torch.sign(u @ top) * top).abs().max()))
        report(f"prototypes vs SVD ({dtype})", err < 1e-4, f"max abs error {err:.2e}")

        # --- 6. rollback restores exactly, copying no parameter ---
        moved, after, copied = _rollback(load_config(None, [
            *size, f"model.params_dtype={dtype}", "algorithm=vp2o", "optimizer.name=adam",
            "optimizer.lr=0.01", "parallel.use_distributed_optimizer=true"]), build, mbs, loss_fn)
        report(f"rollback restores exactly ({dtype}, distributed optimizer)",
               moved > 0 and after == 0.0 and copied == 0,
               f"step moved {moved:.2e}, after restore {after:.2e}, parameters copied {copied}")

        # --- 5. no host syncs added by the VP2O layers ---
        if dtype == "fp32":
            plain_n = _sync_ops(build(cfg_plain, False)[0], tokens, pos)
            vp2o_model = build(cfg, True)[0]
            vp2o_moe.configure_losses(vp2o_model, ortho_coeff=1.0, variance_coeff=1.0)
            ours_n = _sync_ops(vp2o_model, tokens, pos)
            report("VP2O layers add no host-synchronising ops", ours_n == plain_n,
                   f"VP2O {ours_n}, megatron {plain_n}")
    parallel.destroy()
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


def _rollback(cfg, build, mbs, loss_fn) -> tuple[float, float, int]:
    """(how far a step moved the parameters, how far from its state before the step the restore
    left parameters, main params and optimizer state, parameters copied)."""
    from vp2o.mcore import training
    from vp2o.mcore.optim_state import Rollback, max_difference, step_state

    model, ddp, _ = build(cfg, True)
    opt = training.build_optimizer(ddp, cfg)
    rollback = Rollback(model, opt)

    def step():
        training.zero_grads(ddp, opt)
        training.forward_backward(ddp, mbs, loss_fn)
        opt.step()

    step()  # Adam's state exists from here on
    before = [t.clone() for t in step_state(model, opt)]
    rollback.save()
    step()
    n = len(list(model.parameters()))  # step_state lists the model's parameters first
    moved = max_difference(step_state(model, opt)[:n], before[:n])
    rollback.restore()
    return moved, max_difference(step_state(model, opt), before), len(rollback.copied_params)


def _sync_ops(model, tokens, pos) -> dict:
    """Counts of host-synchronising ops in one padded training forward + backward."""
    from vp2o.syncs import host_sync_ops

    t = tokens[:2, :-1]
    pad = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    pad[0, -5:] = True
    model.train()
    return host_sync_ops(lambda: model(
        t, pos, None, labels=tokens[:2, 1:], padding_mask=pad).float().sum().backward())


if __name__ == "__main__":
    sys.exit(main())
