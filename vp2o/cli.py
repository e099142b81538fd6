"""The ``vp2o`` command.

    vp2o demo                                   # the embedded CPU demo (SFT, GRPO, VP2O, report)
    vp2o sft    --config C [key=value ...]      # supervised warm start
    vp2o train  --config C [key=value ...]      # RL (algorithm=grpo|vp2o)
    vp2o eval   --config C [key=value ...]      # score a checkpoint on held-out prompts
    vp2o report RUN_DIR [RUN_DIR ...] --out DIR # report.md + plots from run directories
    vp2o convert hf-to-mcore --hf DIR --out DIR # checkpoint conversion (and mcore-to-hf)
    vp2o launch --dry-run CONFIG --nodes N      # per-node torchrun lines and the resolved layout
    vp2o smoke                                  # a few megatron training steps of the tiny MoE

Every verb takes ``--help``. Overrides are dotted ``section.key=value`` (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vp2o.config import ConfigError, load_config
from vp2o.console import quiet_third_party_warnings
from vp2o.data.tasks import DatasetError
from vp2o.mcore.checkpoint import CheckpointError
from vp2o.report import build_parser as report_arguments


def _config(args: argparse.Namespace, loop: str):
    """The config of a ``vp2o sft/train/eval`` run, checked for that loop (once)."""
    return load_config(args.config, args.overrides, loop=loop)


def _demo(args: argparse.Namespace) -> int:
    from vp2o.demo import run_demo

    run_demo(Path(args.out), args.overrides)
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from vp2o import smoke

    cfg = load_config(args.config, [*args.overrides, "optimizer.lr=3e-3",
                                    "optimizer.warmup_steps=3"] if not args.config
                      else args.overrides)
    losses = smoke.run(cfg, steps=args.steps)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return 0


def _sft(args: argparse.Namespace) -> int:
    from vp2o.sft import sft

    result = sft(_config(args, "sft"))
    print(f"held-out accuracy {result['held_out_accuracy']:.3f}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from vp2o.train import train

    result = train(_config(args, "train"))
    if "stopped_at_step" in result:
        print(f"stopped at step {result['stopped_at_step']} (checkpoint written)")
    else:
        print(f"held-out accuracy {result['held_out_accuracy']:.3f}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vp2o.evaluate import run_eval

    run_eval(_config(args, "eval"), benchmark=args.benchmark, fmt=args.format,
             log_samples=args.log_samples)
    return 0


def _report(args: argparse.Namespace) -> int:
    from vp2o.report import run

    return run(args)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_experts=16")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb)."""
    parser = argparse.ArgumentParser(
        prog="vp2o",
        description="RL post-training (GRPO, VP2O) for Mixture-of-Experts models on megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the embedded CPU demo: SFT, GRPO, VP2O, report",
                       description="Generate the arithmetic task, SFT-warm-start the tiny MoE, "
                       "run GRPO and VP2O from it with the same budget, write runs/demo/report.md.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("overrides", nargs="*", help="extra overrides applied to every phase")
    p.set_defaults(func=_demo)

    from vp2o.convert.cli import add_parser as add_convert_parser

    add_convert_parser(sub)  # vp2o convert hf-to-mcore | mcore-to-hf

    from vp2o.launch import add_parser as add_launch_parser

    add_launch_parser(sub)  # vp2o launch [--dry-run] CONFIG [--nodes N --gpus-per-node G] [k=v]

    p = sub.add_parser("sft", help="supervised warm start on prompt/answer data")
    _with_config(p)
    p.set_defaults(func=_sft)

    p = sub.add_parser("train", help="RL training (algorithm=grpo or vp2o)")
    _with_config(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="score train.init_checkpoint on held-out prompts or a "
                       "benchmark file")
    _with_config(p)
    p.add_argument("--benchmark", default=None,
                   help="JSONL benchmark file (default: the task's held-out prompts)")
    p.add_argument("--format", default="auto",
                   choices=["auto", "math", "choice", "ifeval", "code"],
                   help="benchmark format (auto: from the first row); see docs/results.md")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every response with its prompt, reference answer and reward "
                   "to eval[_<benchmark>]_samples.jsonl in train.run_dir")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="report.md + PNG plots from run directories")
    report_arguments(p)  # the same as python -m vp2o.report (NAME=DIR, a folder of runs)
    p.set_defaults(func=_report)

    p = sub.add_parser("smoke", help="a few megatron training steps of the tiny MoE on a "
                       "counting task (checks the install)")
    p.add_argument("--config", default=None)
    p.add_argument("--steps", type=_positive_int, default=40)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_smoke)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``vp2o ARGV`` parsed; exits with argparse's usage message on bad arguments."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # argparse ends a positional list at the first option: `--config C a=1 --benchmark F b=2`
    # would leave b=2 over. Overrides may come anywhere on the line; anything else is an error.
    stray = [r for r in rest if r.startswith("-") or "=" not in r]
    if stray or (rest and not isinstance(getattr(args, "overrides", None), list)):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vp2o`` console script."""
    args = parse_args(argv)
    quiet_third_party_warnings()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vp2o: config error: {e}", file=sys.stderr)
        return 2
    except DatasetError as e:
        print(f"vp2o: data error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"vp2o: checkpoint error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
