"""Subprocess worker for the checkpoint tests (tests/checkpoint/test_reshard.py, test_faults.py).

    torchrun --nproc_per_node=2 tests/checkpoint/ckpt_worker.py reshard --dir D --out out.pt
    python tests/checkpoint/ckpt_worker.py kill --root R --step S --at write|rename

``reshard`` (EP=2 over 2 ranks), for the distributed optimizer and the plain one: loads the EP=1
checkpoint ``D/ep1_{kind}`` written by the test, records every parameter (global names) and the
losses of the next two steps; then trains a fresh run two steps, saves ``D/ep2_{kind}``, records
its parameters and the losses of the next two steps. Rank 0 writes everything to ``--out``.

``kill`` (one process): saves checkpoint ``S`` into ``R`` and SIGKILLs its own process group in
the middle: ``write`` right after megatron wrote the model and optimizer files, ``rename`` after
the marker was written, just before the rename into place.
"""

from __future__ import annotations

import argparse
import os
import signal


def reshard(args) -> None:
    import torch
    import torch.distributed as dist
    from ckpt_helpers import all_global_params, build_run, small_config, train_step

    from vp2o.mcore import checkpoint as ck
    from vp2o.mcore import parallel

    record = {}
    for i, kind in enumerate(("distributed", "plain")):
        cfg = small_config(ep=2, distributed=kind == "distributed")
        if i == 0:
            parallel.initialize(cfg)
        run = build_run(cfg)
        extra = ck.load_checkpoint(
            ck.latest_checkpoint(f"{args.dir}/ep1_{kind}"),
            model=run.ddp,
            optimizer=run.opt,
            scheduler=run.sched,
        )
        loaded = all_global_params(run)
        losses = [train_step(run, s) for s in (2, 3)]
        record[f"from_ep1_{kind}"] = {"params": loaded, "losses": losses, "extra": extra}

        run = build_run(cfg)
        for s in (0, 1):
            train_step(run, s)
        ck.save_checkpoint(
            f"{args.dir}/ep2_{kind}",
            2,
            model=run.ddp,
            optimizer=run.opt,
            scheduler=run.sched,
            extra={"step": 2, "layout": "ep2"},
        )
        saved = all_global_params(run)
        losses = [train_step(run, s) for s in (2, 3)]
        record[f"ep2_{kind}"] = {"params": saved, "losses": losses}
    if dist.get_rank() == 0:
        torch.save(record, args.out)
    parallel.destroy()


def kill(args) -> None:
    from ckpt_helpers import build_run, small_config, train_step

    from vp2o.mcore import checkpoint as ck
    from vp2o.mcore import parallel
    from vp2o.mcore.checkpoint import markers, save_load

    def die() -> None:
        os.killpg(0, signal.SIGKILL)  # this process and megatron's writer/manager processes

    cfg = small_config()
    parallel.initialize(cfg)
    run = build_run(cfg)
    train_step(run, 0)
    if args.at == "write":
        real_save = save_load._dist_save

        def save_then_die(sd, directory):
            real_save(sd, directory)
            die()

        save_load._dist_save = save_then_die
    else:
        markers.move_into_place = lambda tmp, final: die()
    ck.save_checkpoint(
        args.root, args.step, model=run.ddp, optimizer=run.opt, scheduler=run.sched, extra={}
    )
    raise SystemExit("not killed")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("reshard")
    r.add_argument("--dir", required=True)
    r.add_argument("--out", required=True)
    k = sub.add_parser("kill")
    k.add_argument("--root", required=True)
    k.add_argument("--step", type=int, required=True)
    k.add_argument("--at", choices=("write", "rename"), required=True)
    args = ap.parse_args()
    reshard(args) if args.mode == "reshard" else kill(args)


if __name__ == "__main__":
    main()
