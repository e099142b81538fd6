"""Helpers of the reliability tests: the tiny config, subprocess runners, checkpoint
readers. Every trainer here is the real megatron-core model on the CPU at toy size."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from tiny_train import TINY as TINY_TRAIN
from torchrun import launcher

from vp2o.mcore.parallel import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HOOKS = HERE / "train_hooks.py"

# The shared toy config, with a deterministic non-trivial reward (faulty_rewards:parity)
TINY = [
    *TINY_TRAIN,
    "reward.name=faulty_rewards:parity", "train.wandb_mode=disabled", "algorithm=grpo",
]


def env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),  # not this process's (in-process runs set one)
    }


def hooks_cmd(*hook_args: str, train_args: list[str], torchrun: int = 0) -> list[str]:
    """``vp2o train`` (through train_hooks.py) as a command line."""
    return [*launcher(torchrun), str(HOOKS), *hook_args, "--", "train", *TINY, *train_args]


def run_train(*hook_args: str, train_args: list[str], timeout: float = 300):
    """Run ``vp2o train`` in a subprocess to the end; returns the CompletedProcess."""
    return subprocess.run(hooks_cmd(*hook_args, train_args=train_args), capture_output=True,
                          text=True, timeout=timeout, env=env(), cwd=REPO)


def popen_train(*hook_args: str, train_args: list[str], torchrun: int = 0) -> subprocess.Popen:
    """Start ``vp2o train`` in its own process group (killpg reaches megatron's helpers)."""
    return subprocess.Popen(hooks_cmd(*hook_args, train_args=train_args, torchrun=torchrun),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            cwd=REPO, start_new_session=True)


def checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (model and optimizer), read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.parent.parent.name}_{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and "_extra_state" not in k}


def trainer_extra(path: Path) -> dict:
    return torch.load(path / "trainer_state.pt", weights_only=True)["extra"]




