"""``vp2o convert`` sub-commands (registered with ``vp2o.convert.cli.add_parser``) and the
``tools/convert_*.py`` wrappers."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vp2o.config import load_config
from vp2o.convert.cli import add_parser, parse_size

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vp2o")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_hf_to_mcore_and_back(hf_checkpoints, tmp_path, capsys):
    parser = _parser()
    hf_dir = hf_checkpoints["mixtral"][0]
    args = parser.parse_args(
        ["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "m"), "--ep", "2"]
    )
    assert args.func(args) == 0
    assert "hf-to-mcore: mixtral" in capsys.readouterr().out
    args = parser.parse_args(
        [
            "convert",
            "mcore-to-hf",
            "--mcore",
            str(tmp_path / "m"),
            "--out",
            str(tmp_path / "h"),
            "--max-shard-size",
            "20KB",
        ]
    )
    assert args.func(args) == 0
    assert "mcore-to-hf: mixtral" in capsys.readouterr().out
    assert len(list((tmp_path / "h").glob("model-*-of-*.safetensors"))) > 1
    # what the flags asked for, and the source's tensors back bit for bit
    assert load_config(tmp_path / "m" / "config.yaml").parallel.expert_parallel == 2
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        source = {name: f.get_tensor(name) for name in f.keys()}
    back = {}
    for file in (tmp_path / "h").glob("model-*-of-*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            back.update({name: f.get_tensor(name) for name in f.keys()})
    assert back.keys() == source.keys()
    assert all(torch.equal(back[n], t) for n, t in source.items())


def test_errors_exit_2_with_the_message(tmp_path, capsys):
    args = _parser().parse_args(
        ["convert", "mcore-to-hf", "--mcore", str(tmp_path), "--out", str(tmp_path / "h")]
    )
    assert args.func(args) == 2
    assert "vp2o convert: error:" in capsys.readouterr().err and not (tmp_path / "h").exists()


def test_bad_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["convert", "hf-to-mcore", "--hf", "a", "--out", "b", "--ep", "0"])
    with pytest.raises(SystemExit):
        _parser().parse_args(
            ["convert", "mcore-to-hf", "--mcore", "a", "--out", "b", "--max-shard-size", "lots"]
        )
    capsys.readouterr()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("123") == 123


@pytest.mark.parametrize("tool", ["convert_hf_to_mcore.py", "convert_mcore_to_hf.py"])
def test_tool_wrappers_run(tool):
    proc = subprocess.run(
        [sys.executable, str(TOOLS / tool), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout
