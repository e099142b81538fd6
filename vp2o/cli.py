"""The ``vp2o`` command.

vp2o demo [--steps N] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import sys
import warnings

from vp2o.config import ConfigError, load_config


def _demo(args: argparse.Namespace) -> int:
    from vp2o import smoke

    cfg = load_config(
        args.config,
        [*args.overrides, "optimizer.lr=3e-3", "optimizer.warmup_steps=3"]
        if not args.config
        else args.overrides,
    )
    losses = smoke.run(cfg, steps=args.steps)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return 0


def quiet_third_party_warnings() -> None:
    """megatron-core warns at import about optional apex/TE and deprecated torch collectives;
    none of it is actionable for a vp2o user, so the CLI hides it (the library does not)."""
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    warnings.filterwarnings("ignore", message=r".*\.grad attribute of a Tensor that is not a leaf")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb)."""
    parser = argparse.ArgumentParser(
        prog="vp2o",
        description="RL post-training (GRPO, VP2O) for Mixture-of-Experts models on megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="build the tiny MoE and train it a few steps on CPU (megatron-core, real MoE layers)",
        description="Build the embedded tiny MoE and run megatron-core training steps on a "
        "copy task, printing the loss.",
    )
    demo.add_argument("--config", default=None, help="YAML config (default: built-in tiny model)")
    demo.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_experts=16")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vp2o`` console script."""
    args = build_parser().parse_args(argv)
    quiet_third_party_warnings()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vp2o: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
