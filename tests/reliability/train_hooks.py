"""``vp2o train`` with fault-injection hooks, for the reliability tests (also under torchrun).

    python tests/reliability/train_hooks.py [--dump DIR] [--pause-save STEP --ready FILE]
        [--remount-ro-at STEP --mount PATH] [--pause-generate STEP --ready FILE]
        -- train [key=value ...]

- ``--dump DIR``: after each rollout, ``DIR/rollout_{step:04d}_rank{r}.pt`` holds the prompts,
  tokens and behaviour log-probs of the batch (and under ``pending`` the whole batch's
  ``PendingBatch.state_dict()``), and ``DIR/rank{r}.pid`` this process's pid.
- ``--pause-save STEP --ready FILE``: the save of checkpoint ``STEP`` writes megatron's files into
  its temporary directory, then touches ``FILE`` and sleeps (the test SIGKILLs the process).
- ``--remount-ro-at STEP --mount PATH``: before the rollout of loop step ``STEP``, remount the
  tmpfs at ``PATH`` read-only (the checkpoint directory becomes unwritable mid-run).
- ``--pause-generate STEP --ready FILE`` (``rollout.engine=vllm``): in the rollout of loop step
  ``STEP``, after the vLLM engine's second engine step (requests in flight, a KV cache filled,
  tokens sampled), touch ``FILE`` and sleep (the test SIGKILLs the process).

The hooks wrap module-level functions; nothing in vp2o is edited. The entry point is guarded:
megatron's checkpoint writer re-imports the main module in a spawned process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def install(args) -> None:
    import torch

    import vp2o.train as train_module
    from vp2o.mcore.checkpoint import save_load

    rank = int(os.environ.get("RANK", "0"))
    if args.dump or args.remount_ro_at is not None or args.pause_generate is not None:
        real_make_rollouts = train_module.make_rollouts

        def make_rollouts(s, rows, pool, step):
            if args.pause_generate is not None and step == args.pause_generate:
                pause_in_vllm_generation(Path(args.ready))
            if args.remount_ro_at is not None and step == args.remount_ro_at and rank == 0:
                subprocess.run(["mount", "-o", "remount,ro", args.mount], check=True)
            pending = real_make_rollouts(s, rows, pool, step)
            if args.dump:
                out = Path(args.dump)
                out.mkdir(parents=True, exist_ok=True)
                b = pending.batch
                torch.save(
                    {"prompts": [r["prompt"] for r in rows], "tokens": b.tokens,
                     "behavior_logprobs": b.behavior_logprobs, "rewards": pending.rewards,
                     "pending": pending.state_dict()},
                    out / f"rollout_{step:04d}_rank{rank}.pt",
                )
                (out / f"rank{rank}.pid").write_text(str(os.getpid()))
            return pending

        train_module.make_rollouts = make_rollouts
    if args.pause_save is not None:
        real_dist_save = save_load._dist_save

        def dist_save(sharded_state_dict, directory):
            real_dist_save(sharded_state_dict, directory)
            if Path(directory).name == f".tmp_step_{args.pause_save:08d}":
                Path(args.ready).write_text(str(os.getpid()))
                time.sleep(3600)

        save_load._dist_save = dist_save


def pause_in_vllm_generation(ready: Path) -> None:
    """From now on, the vLLM engine's second step touches ``ready`` and sleeps."""
    from vllm.v1.engine.llm_engine import LLMEngine

    real_step, calls = LLMEngine.step, []

    def step(self):
        out = real_step(self)
        calls.append(1)
        if len(calls) == 2:
            ready.write_text(str(os.getpid()))
            time.sleep(3600)
        return out

    LLMEngine.step = step


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump")
    ap.add_argument("--pause-save", type=int)
    ap.add_argument("--ready")
    ap.add_argument("--remount-ro-at", type=int)
    ap.add_argument("--mount")
    ap.add_argument("--pause-generate", type=int)
    args = ap.parse_args(argv[:split])
    install(args)
    from vp2o.cli import main as cli_main

    return cli_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
