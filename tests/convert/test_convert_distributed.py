"""A converted checkpoint loads in a 2-process expert-parallel run (torchrun over gloo; megatron
reshards the single-layout checkpoint onto EP=2) and gives the single-process logits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from torchrun import launcher, worker_env

WORKER = Path(__file__).with_name("dist_load_worker.py")




@pytest.mark.slow
def test_ep2_load_matches_single_process(hf_checkpoints, converted, megatron_logits, tmp_path):
    mcore_dir = converted("qwen3_moe")  # 4 experts, one dense layer, GQA, qk-norm
    out = tmp_path / "ep2.pt"
    cmd = [*launcher(2), str(WORKER), "--ckpt", str(mcore_dir), "--ep", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=worker_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = torch.load(out, weights_only=False)
    single = megatron_logits(mcore_dir)
    _, hf = hf_checkpoints["qwen3_moe"]
    assert [r["experts"] for r in ranks] == [2 * 2, 2 * 2]  # 2 MoE layers x 2 local experts
    for r in ranks:
        torch.testing.assert_close(r["logits"], single, rtol=0, atol=1e-5)
        assert (r["logits"] - hf).abs().max().item() <= 1e-4
