"""Stein transform of all MoE layers of a rank: a chain per layer against batched calls.

    .venv/bin/python benchmarks/bench_transport_layers.py --layers 8 --experts 8 --d 128 --f 128
    .venv/bin/python benchmarks/bench_transport_layers.py --threads 1 2

The per-step work of the transform after the routing statistics (kernel and masks are batched over
layers already): each layer's repulsion factors (§7, 2 power-iteration steps and their backward)
and the attraction `A·G` of its fc1 and fc2 gradients with the rank-4 repulsion added to fc2.

- per layer: `stein.repulsion_factors` and two `torch.mm` per layer, as `SteinTransform` runs them;
- batched: the same computations with a leading layer dimension, one call each (the weights and
  gradients of all layers stacked beforehand, which the timing does not include: in megatron's
  buffers other parameters sit between two layers' experts, so production would add a copy).

Prints median and minimum milliseconds per transform, alternating the two forms.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from vp2o.algo import stein


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--f", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    a = ap.parse_args()
    n_l, e, d, f = a.layers, a.experts, a.d, a.f
    gen = torch.Generator().manual_seed(0)
    w2 = torch.randn(n_l, e, d, f, generator=gen)
    u = stein.refresh_prototypes(w2, torch.randn(n_l, e, d, generator=gen), iters=20)
    v = torch.rand(n_l, e, e, generator=gen)
    g1 = torch.randn(n_l, e, 2 * f * d, generator=gen)
    g2 = torch.randn(n_l, e, d * f, generator=gen)
    a_w = torch.softmax(torch.randn(n_l, e, e, generator=gen), -1)
    tau = 1.0 / math.log(e)
    out1, out2 = torch.empty_like(g1), torch.empty_like(g2)

    def per_layer() -> None:
        for i in range(n_l):
            left, right = stein.repulsion_factors(w2[i], u[i], v[i], tau=tau, iters=2)
            torch.mm(a_w[i], g1[i], out=out1[i])
            torch.mm(a_w[i], g2[i], out=out2[i])
            out2[i].view(e, d, f).baddbmm_(left, right, alpha=0.1)

    def batched() -> None:
        left, right = stein._repulsion_block(w2, u, u, v, tau, 2, None, "axial")  # [L, E, ...]
        torch.bmm(a_w, g1, out=out1)
        torch.bmm(a_w, g2, out=out2)
        out2.view(n_l * e, d, f).baddbmm_(left.reshape(n_l * e, d, -1),
                                          right.reshape(n_l * e, -1, f), alpha=0.1)

    # the two forms compute the same thing
    per_layer()
    want = out2.clone()
    batched()
    torch.testing.assert_close(out2, want, rtol=1e-4, atol=1e-5)
    for threads in a.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {"per layer": [], "batched": []}
        for _ in range(a.repeats):
            for name, fn in (("per layer", per_layer), ("batched", batched)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            print(f"layers {n_l}, E {e}, d {d}, f {f}, threads {threads}, {name}: "
                  f"median {1e3 * statistics.median(ts):.2f} ms, min {1e3 * min(ts):.2f} ms")


if __name__ == "__main__":
    main()
