"""VP2O's post-update check in its own forward or in the next update's
(``vp2o.check_in_next_forward``): the trainer's step time both ways, side by side.

    .venv/bin/python benchmarks/bench_check.py        # demo VP2O, 4 updates per batch
    .venv/bin/python benchmarks/bench_check.py --rounds 5 --steps 16 \
        --set vp2o.behavior.eps_drift=0.05

Each round runs ``vp2o train`` on ``--config`` (default the demo's VP2O phase; it reads the demo's
SFT checkpoint and tokenizer, so run ``make demo`` or ``vp2o sft --config
examples/vp2o/configs/demo_sft.yaml`` first) for ``--steps`` steps with
``train.updates_per_rollout=--updates``, once with the check in its own no-grad forward and once
read from the next update's forward, in alternating order; the first 2 steps of every run are
dropped. Prints per run the median ``perf/step_s`` and ``perf/train_s``, the mean updates per
batch, the discarded backwards and the accepted fraction (the decisions must agree), then the
median over rounds of the per-round ratio, last:

    step time ratio next-forward/own-forward: X.XXX
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2


def run(config: str, steps: int, updates: int, fused: bool, extra: list[str], out: Path) -> dict:
    """One trainer run; its per-step medians and decision counts."""
    cmd = [sys.executable, "-m", "vp2o.cli", "train", *(["--config", config] if config else []),
           f"train.steps={steps}", f"train.updates_per_rollout={updates}",
           f"vp2o.check_in_next_forward={str(fused).lower()}", f"train.run_dir={out}",
           "train.wandb_mode=disabled", "train.resume=never", "train.save_every=0", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[WARMUP:]
    return {
        "step_s": statistics.median(r["perf/step_s"] for r in rows),
        "train_s": statistics.median(r["perf/train_s"] for r in rows),
        "updates": statistics.mean(r["train/updates"] for r in rows),
        "discarded": sum(r.get("events/discarded_backward", 0.0) for r in rows),
        "accepted": statistics.mean(r.get("trust/accepted", 1.0) for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="examples/vp2o/configs/demo_vp2o.yaml",
                    help="trainer config file ('' = none: the defaults and --set only)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help=f"steps per run ({WARMUP} warm-up)")
    ap.add_argument("--updates", type=int, default=4, help="train.updates_per_rollout")
    ap.add_argument("--set", nargs="*", default=[], help="more key=value overrides")
    args = ap.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench_check_") as tmp:
        for r in range(args.rounds):
            times = {}
            for fused in ((False, True) if r % 2 == 0 else (True, False)):
                res = run(args.config, args.steps, args.updates, fused, args.set,
                          Path(tmp) / f"{r}_{fused}")
                times[fused] = res["step_s"]
                name = "next-forward" if fused else "own-forward"
                print(f"round {r} {name:>12}: step {res['step_s']:.3f} s, train "
                      f"{res['train_s']:.3f} s, updates/batch {res['updates']:.2f}, discarded "
                      f"backwards {res['discarded']:.0f}, accepted {res['accepted']:.2f}",
                      flush=True)
            ratios.append(times[True] / times[False])
    print(f"per-round ratios: {', '.join(f'{x:.3f}' for x in ratios)}")
    print(f"step time ratio next-forward/own-forward: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
