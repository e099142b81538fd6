"""Multi-process megatron-core training on CPU (gloo via torchrun) equals the single-process run.

The tiny MoE trains 3 steps on the same global batch with megatron DDP and EP=2 and is compared,
against one process holding the whole batch: the losses, the reduced gradients each rank holds,
and the parameters after the SGD steps. Here with the allgather token dispatcher; the alltoall
dispatcher, the distributed optimizer and EP=1 x DP=2 are compared the same way with VP2O's
transform on top (tests/mcore/test_vp2o_distributed.py), and its identity configuration is
checked there to be megatron's plain step bit for bit.
"""

from __future__ import annotations

import pytest
from dist_helpers import compare, run_worker


@pytest.mark.slow
def test_ep2_allgather_dispatcher_matches_single_process(tmp_path):
    args = ("--optimizer", "sgd", "--distributed-optimizer", "0", "--dispatcher", "allgather")
    single = run_worker(tmp_path, 1, "--ep", "1", *args)
    compare(single, run_worker(tmp_path, 2, "--ep", "2", *args), check_params=True)
