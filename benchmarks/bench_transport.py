"""Stein transport of one MoE layer against a plain `A @ G` of the same shapes (issue 3).

Run from the repository root:

    .venv/bin/python benchmarks/bench_transport.py

Options: `--experts 8 64 128 --d 512 --f 1024 --repeats 7 --threads <cpu count>`.

For each E, a SwiGLU expert layer (fc1 [E, 2f, d], fc2 [E, d, f]; P = 3·d·f parameters per expert)
in float32 on the CPU. Timed, alternating, in the same run:

- `A @ G`: one `torch.mm` of [E, E] by [E, P] into a preallocated output.
- transport: prototype refresh (§4, 2 power-iteration steps), kernel (§5), neighbour masks (§3),
  attraction (§6, the same matmul, into a preallocated output) and repulsion (§7, added into the
  fc2 rows of that output), i.e. `refresh_prototypes` + `stein.transport`.

The co-activation matrix (§3) is computed beforehand: it comes from the forward pass's routing map.
Prints median and minimum times and their ratios (target: transport / matmul <= 1.5). On a shared
machine the minimum is the better estimate: other processes only ever add time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vp2o.algo import stein


def bench_one(
    num_experts: int, d: int, f: int, repeats: int, top_k: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Seconds per run of (plain A @ G, full transport) for one layer of `num_experts` experts.

    The inputs are drawn on the CPU (same numbers on every device) and then moved to `device`;
    on CUDA each timed call is bracketed by synchronisations, so the times are the kernels'.
    """
    e = num_experts
    gen = torch.Generator().manual_seed(0)
    p = 3 * d * f
    grads = torch.randn(e, p, generator=gen)  # [E, P], fc1 then fc2 per expert row
    w2 = torch.randn(e, d, f, generator=gen) / f**0.5  # [E, d, f]
    u_prev = stein.init_prototypes(w2)  # [E, d]

    tokens = 4096
    scores = torch.rand(tokens, e, generator=gen)
    ids = scores.topk(top_k, dim=-1).indices
    routing_map = torch.zeros(tokens, e, dtype=torch.bool).scatter_(1, ids, True)  # [T, E]
    coact = stein.coactivation(routing_map)  # [E, E]
    a = torch.softmax(torch.randn(e, e, generator=gen), -1)  # any row-stochastic [E, E]
    tau = stein.temperature(e)
    grads, w2, u_prev, coact, a = (t.to(device) for t in (grads, w2, u_prev, coact, a))
    g1 = grads[:, : 2 * f * d].view(e, 2 * f, d)  # [E, 2f, d]
    g2 = grads[:, 2 * f * d :].view(e, d, f)  # [E, d, f]
    out = torch.empty_like(grads)  # [E, P]
    o1 = out[:, : 2 * f * d].view(e, 2 * f, d)
    o2 = out[:, 2 * f * d :].view(e, d, f)
    plain_out = torch.empty_like(grads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def plain() -> None:
        torch.mm(a, grads, out=plain_out)

    def transport() -> None:
        u = stein.refresh_prototypes(w2, u_prev, iters=2)
        stein.transport(
            [g1, g2],
            w2,
            u,
            coact,
            w2_index=1,
            tau=tau,
            alpha=0.1,
            top_m=top_k,
            min_frac=0.1,
            iters=2,
            out=[o1, o2],
        )

    plain()
    transport()
    sync()
    t_plain: list[float] = []
    t_transport: list[float] = []
    for _ in range(repeats):
        for fn, times in ((plain, t_plain), (transport, t_transport)):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return t_plain, t_transport


def main() -> None:
    """Parse arguments, run every E, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--f", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 on either)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"d={args.d} f={args.f} float32 {where}, {torch.get_num_threads()} threads, "
        f"{args.repeats} alternating runs each; times in ms, median (min)"
    )
    print(f"{'E':>5} {'A@G':>16} {'transport':>16} {'ratio':>6} {'ratio(min)':>11}")
    for e in args.experts:
        t_plain, t_transport = bench_one(e, args.d, args.f, args.repeats, top_k=min(8, e // 4),
                                      device=device)
        med_p, med_t = statistics.median(t_plain), statistics.median(t_transport)
        min_p, min_t = min(t_plain), min(t_transport)
        print(
            f"{e:>5} {med_p * 1e3:>8.1f} ({min_p * 1e3:>5.1f}) {med_t * 1e3:>8.1f} "
            f"({min_t * 1e3:>5.1f}) {med_t / med_p:>6.2f} {min_t / min_p:>11.2f}"
        )


if __name__ == "__main__":
    main()
