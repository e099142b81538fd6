"""Worker of tests/rollout/test_vllm_tp_requests.py (torchrun, gloo): each rank gathers its
prompts and seeds over its rollout tensor-parallel group and writes what it got as JSON to
``OUT/rank{r}.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from vp2o.rollout.vllm_engine import gather_requests, rollout_tp_group


def main() -> None:
    tp = int(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # rank r holds r + 1 prompts (unequal counts), prompt j of rank r is [r, j]
    prompts = [[rank, j] for j in range(rank + 1)]
    seeds = [100 * rank + j for j in range(rank + 1)]
    group = rollout_tp_group(tp)
    out = {"rank": rank, "group": group is not None}
    if group is not None:
        out["prompts"], out["seeds"], out["first"] = gather_requests(group, prompts, seeds)
    (Path(sys.argv[2]) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
