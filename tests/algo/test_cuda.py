"""The same functions on CUDA give the CPU results (device handling; skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from vp2o.algo import grpo, specialization, stein, trust_region

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _both(fn, *tensors):
    cpu = fn(*tensors)
    gpu = fn(*(t.cuda() for t in tensors))
    return cpu, gpu


def _close(cpu, gpu, **tol) -> None:
    if isinstance(cpu, dict):
        for key in cpu:
            _close(cpu[key], gpu[key], **tol)
    elif isinstance(cpu, list | tuple):
        for a, b in zip(cpu, gpu, strict=True):
            _close(a, b, **tol)
    else:
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, **tol)


def test_stein_transport_on_cuda() -> None:
    gen = torch.Generator().manual_seed(0)
    e, d, f = 16, 64, 96
    w2 = torch.randn(e, d, f, generator=gen, dtype=torch.float64)
    g1 = torch.randn(e, 2 * f, d, generator=gen, dtype=torch.float64)
    g2 = torch.randn(e, d, f, generator=gen, dtype=torch.float64)
    routing = torch.zeros(200, e, dtype=torch.bool).scatter_(
        1, torch.rand(200, e, generator=gen).topk(2, -1).indices, True
    )
    routing[:, 3] = False

    def run(w2, g1, g2, routing):
        u = stein.init_prototypes(w2)
        u = stein.refresh_prototypes(w2, u, iters=2)
        c = stein.coactivation(routing).double()
        tau = stein.median_temperature(u)
        outs, metrics = stein.transport(
            [g1, g2],
            w2,
            u,
            c,
            w2_index=1,
            tau=tau,
            alpha=0.1,
            top_m=2,
            min_frac=0.1,
            iters=2,
            attraction_norm=True,
        )
        return [u, *outs], metrics

    cpu, gpu = _both(run, w2, g1, g2, routing)
    _close(cpu, gpu, rtol=1e-9, atol=1e-9)


def test_losses_and_trust_region_on_cuda() -> None:
    gen = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 6, generator=gen)
    logp_old = logp + 0.1 * torch.randn(4, 6, generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.2
    adv = torch.randn(4, generator=gen)

    def losses(logp, logp_old, mask, adv):
        out = {}
        for est, clip in (("ratio", 0.2), ("gspo", 0.01), ("logprob", None)):
            loss, stats = grpo.policy_loss(
                logp,
                logp_old,
                adv,
                mask,
                clip,
                clip,
                "seq_mean_token_sum_norm",
                pg_estimator=est,
                logp_ref=logp_old,
                kl_coeff=0.1,
            )
            out[est] = loss
            out.update({f"{est}/{k}": v for k, v in stats.items()})
        out["adv"] = grpo.group_advantages(adv, 2)
        out["drift"], out["ess"] = trust_region.behavior_stats(logp, logp_old, mask, 0.5)
        return out

    _close(*_both(losses, logp, logp_old, mask, adv), rtol=1e-5, atol=1e-6)

    ids = torch.randint(0, 8, (2, 3, 10, 2), generator=gen)
    gates = torch.rand(2, 3, 10, 2, generator=gen)
    u = torch.nn.functional.normalize(torch.randn(2, 1, 8, 5, generator=gen), dim=-1)
    u_anc = torch.nn.functional.normalize(torch.randn(2, 1, 8, 5, generator=gen), dim=-1)
    x = torch.randn(10, 2, 5, generator=gen)
    scores = torch.softmax(torch.randn(10, 8, generator=gen), -1)

    def rest(ids, gates, u, u_anc, x, scores):
        return (
            trust_region.anchor_distance(ids, gates, u, ids.flip(-2), gates, u_anc),
            specialization.orthogonality_loss(x),
            specialization.routing_variance_loss(scores),
        )

    _close(*_both(rest, ids, gates, u, u_anc, x, scores), rtol=1e-5, atol=1e-6)
