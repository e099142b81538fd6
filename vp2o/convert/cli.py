"""``vp2o convert``: the command-line front end of :mod:`vp2o.convert`.

    vp2o convert hf-to-mcore --hf DIR --out DIR [--tp N --ep N --pp N] [--dtype bf16]
    vp2o convert mcore-to-hf --mcore DIR --out DIR [--config C] [--family F] [--max-shard-size 5GB]

:func:`add_parser` registers the sub-command on ``vp2o``'s parser; :func:`main` runs it alone
(``tools/convert_*.py``). Heavy imports (torch, megatron-core) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a plain integer (``i``: binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 500MB or 2GiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    base = 1024 if binary else 1000
    power = " KMGT".index(unit) if unit else 0
    return int(value * base**power)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


def _report(kind: str, result, seconds: float) -> None:
    print(
        f"{kind}: {result.family}, {result.num_tensors} tensors, "
        f"{result.total_bytes / 1e9:.2f} GB (largest {result.largest_tensor_bytes / 1e6:.1f} MB) "
        f"-> {result.out} in {seconds:.1f} s"
    )
    narrowed = getattr(result, "narrowed", ())
    if narrowed:  # a mixed-dtype checkpoint: say what lost precision
        print(f"note: {len(narrowed)} HF tensors were stored in a wider dtype than the "
              f"parameters they fill and were rounded (e.g. {narrowed[0]}); pass --dtype to "
              "keep a wider parameter dtype")


def _run(fn, args: argparse.Namespace) -> int:
    from vp2o.config import ConfigError
    from vp2o.convert.tensors import ConvertError

    start = time.perf_counter()
    try:
        result = fn(args)
    except (ConvertError, ConfigError) as e:
        print(f"vp2o convert: error: {e}", file=sys.stderr)
        return 2
    _report(args.convert_command, result, time.perf_counter() - start)
    return 0


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from vp2o.convert import hf_to_mcore

    return _run(
        lambda a: hf_to_mcore(
            a.hf,
            a.out,
            tensor_parallel=a.tp,
            expert_parallel=a.ep,
            pipeline_parallel=a.pp,
            dtype=a.dtype,
        ),
        args,
    )


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from vp2o.convert import mcore_to_hf

    return _run(
        lambda a: mcore_to_hf(
            a.mcore, a.out, config=a.config, family=a.family, max_shard_bytes=a.max_shard_size
        ),
        args,
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``convert`` (with ``hf-to-mcore`` and ``mcore-to-hf``) on ``subparsers``.

    Each leaf sets ``func`` (taking the parsed namespace, returning an exit code), like the other
    ``vp2o`` verbs.
    """
    convert = subparsers.add_parser(
        "convert",
        help="convert MoE checkpoints between Hugging Face and megatron-core",
        description="Convert Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE checkpoints between Hugging "
        "Face safetensors and megatron-core dist checkpoints, one tensor at a time. The output "
        "is written to a temporary sibling directory and renamed into place when complete.",
    )
    sub = convert.add_subparsers(dest="convert_command", required=True)
    a = sub.add_parser(
        "hf-to-mcore",
        help="HF safetensors -> megatron-core dist checkpoint + vp2o config.yaml",
        description="Convert an HF checkpoint into a megatron-core dist checkpoint (loadable "
        "under any parallel layout) with config.yaml beside it.",
    )
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    a.add_argument("--tp", type=_positive, default=1, help="tensor parallel size to record (1)")
    a.add_argument("--ep", type=_positive, default=1, help="expert parallel size to record (1)")
    a.add_argument("--pp", type=_positive, default=1, help="pipeline parallel size to record (1)")
    a.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="parameter dtype (default: the checkpoint's)",
    )
    a.set_defaults(func=_hf_to_mcore)
    b = sub.add_parser(
        "mcore-to-hf",
        help="megatron-core dist checkpoint -> HF safetensors shards + config.json",
        description="Convert a vp2o megatron-core checkpoint directory (config.yaml + dist "
        "checkpoint) into HF safetensors shards with an index and a config.json.",
    )
    b.add_argument(
        "--mcore",
        required=True,
        help="dist checkpoint: a directory hf-to-mcore wrote, or a training checkpoint step_N",
    )
    b.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    b.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="largest safetensors shard, e.g. 5GB (default), 500MB",
    )
    b.add_argument(
        "--config",
        default=None,
        help="model config when --mcore has no config.yaml (e.g. a training checkpoint): a vp2o "
        "YAML, or the directory hf-to-mcore wrote (its HF config and tokenizer are reused)",
    )
    b.add_argument(
        "--family",
        default=None,
        help="HF family (qwen3_moe, qwen2_moe, mixtral, olmoe) when the directory does not "
        "record it",
    )
    b.set_defaults(func=_mcore_to_hf)
    return convert


def main(argv: list[str] | None = None) -> int:
    """``python -m vp2o.convert.cli hf-to-mcore ...`` (the ``convert`` verb on its own)."""
    parser = argparse.ArgumentParser(prog="vp2o")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    from vp2o.console import quiet_third_party_warnings

    quiet_third_party_warnings()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
