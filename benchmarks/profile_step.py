"""Where VP2O's forward + backward overhead goes: an operator profile of one training forward +
backward of megatron's own MoE layers (GRPO) and of VP2O's layers, same shapes and batch.

    .venv/bin/python benchmarks/profile_step.py                  # the CPU config of bench_step
    python3 benchmarks/profile_step.py --layers 4 --hidden 1024 --experts 64 --topk 8 \\
        --expert-ffn 768 --seq 4096 --dtype bf16                 # bench_step's GPU size

After a warm-up it times ``--repeats`` forward + backward passes of each model, alternating
(median wall time), then profiles ``--profiled`` more of each (alternating) and prints, per
operator, the mean self time on the host (and on the device where there is one) and the call
count in both models, largest difference first. On a GPU the host column is what matters when
the step is launch-bound (the device idles between small kernels); the call counts show how many
launches VP2O adds.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import warnings

import torch
from bench_model import add_model_arguments, build, model_overrides, synthetic_batch

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--profiled", type=int, default=3, help="profiled passes per model")
    ap.add_argument("--rows", type=int, default=25, help="operators listed")
    args = ap.parse_args()

    from vp2o.config import load_config
    from vp2o.console import quiet_third_party_warnings
    from vp2o.mcore import parallel, training

    quiet_third_party_warnings()
    common = model_overrides(args)
    cfgs = {"grpo": load_config(None, [*common, "algorithm=grpo"]),
            "vp2o": load_config(None, [*common, "algorithm=vp2o"])}
    parallel.initialize(cfgs["grpo"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    runs = {name: build(cfg, name)[1:] for name, cfg in cfgs.items()}  # (ddp, optimizer)
    mbs, loss_fn = synthetic_batch(args, device, torch.Generator().manual_seed(0))
    n_mb = len(mbs)

    def forward_backward(name):
        ddp, opt = runs[name]
        training.zero_grads(ddp, opt)
        training.forward_backward(ddp, mbs, loss_fn)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        for name in runs:
            forward_backward(name)
    times = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            forward_backward(name)
            times[name].append(time.perf_counter() - t0)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # Per-operator totals averaged over --profiled passes of each model, alternating (one pass
    # alone moves by tens of % per operator on a busy host).
    sums = {name: collections.defaultdict(lambda: [0.0, 0.0, 0]) for name in runs}
    for r in range(args.profiled):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            with torch.profiler.profile(activities=activities) as prof:
                forward_backward(name)
            for e in prof.key_averages():
                acc = sums[name][e.key]
                acc[0] += e.self_cpu_time_total / args.profiled
                acc[1] += getattr(e, "self_device_time_total", 0.0) / args.profiled
                acc[2] = e.count  # the same every pass
    rows = {name: {k: tuple(v) for k, v in sums[name].items()} for name in runs}
    dev = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {dev}; {args.layers} layers, d={args.hidden}, {args.experts} experts "
          f"top-{args.topk}, f={args.expert_ffn}, seq {args.seq}, batch {args.batch} "
          f"({n_mb} micro-batches), {args.dtype}")
    for name in runs:
        host = sum(v[0] for v in rows[name].values()) / 1e3
        device_ms = sum(v[1] for v in rows[name].values()) / 1e3
        calls = sum(v[2] for v in rows[name].values())
        print(f"{name}: forward+backward median {statistics.median(times[name]) * 1e3:.1f} ms "
              f"over {args.repeats}; profiled (mean of {args.profiled}): host self {host:.1f} ms, "
              "device self "
              f"{device_ms:.1f} ms, {calls} operator calls")
    zero = (0.0, 0.0, 0)
    keys = set(rows["grpo"]) | set(rows["vp2o"])
    diff = collections.Counter({
        k: rows["vp2o"].get(k, zero)[0] + rows["vp2o"].get(k, zero)[1]
        - rows["grpo"].get(k, zero)[0] - rows["grpo"].get(k, zero)[1] for k in keys})
    print(f"{'operator':<52}{'host ms g/v':>16}{'device ms g/v':>18}{'calls g/v':>14}")
    for k, _ in diff.most_common(args.rows):
        g, v = rows["grpo"].get(k, zero), rows["vp2o"].get(k, zero)
        print(f"{k[:51]:<52}{g[0] / 1e3:>7.2f}/{v[0] / 1e3:<8.2f}{g[1] / 1e3:>8.2f}/"
              f"{v[1] / 1e3:<9.2f}{g[2]:>6}/{v[2]:<7}")
    parallel.destroy()


if __name__ == "__main__":
    main()
