"""Worker for the expert-parallel generation test (run by tests/rollout/test_rollout_dist.py).

    torchrun --nproc_per_node=2 tests/rollout/dist_generate_worker.py --ep 2 --out result.pt

Builds the tiny VP2O MoE with expert parallelism ``--ep`` and identical weights at every layout
(each parameter drawn from a generator seeded by its global name), then rank r generates prompt
set r with a generator seeded by r, synchronising its decode steps over the EP group. The sets
differ in size and length so that, left alone, the ranks would stop after different numbers of
steps (and the all-to-all would hang). Rank 0 saves every rank's batches. The test runs the same
``run_set`` for every set in one process and compares.
"""

from __future__ import annotations

import argparse
import zlib

import torch
import torch.distributed as dist
from rollout_fixtures import TINY

from vp2o.config import load_config
from vp2o.mcore import model as mdl
from vp2o.mcore import parallel, vp2o_moe
from vp2o.rollout import SamplingParams, generate

PROMPT_SETS = [
    [[5, 6, 7]],  # rank 0: one short prompt
    [[8, 9, 10, 11, 12], [13], [14, 15, 16, 17]],  # rank 1: three prompts
]
PARAMS = SamplingParams(
    temperature=1.0,
    max_new_tokens=12,
    group_size=2,
    stop_token_ids=tuple(range(3, 12)),
    record_routing=True,
)
FIELDS = (
    "tokens",
    "position_ids",
    "valid",
    "response_mask",
    "behavior_logprobs",
    "routing_ids",
    "routing_gates",
    "truncated",
)


class Tokenizer:
    """The minimum generate needs: ids 0 pad, 2 eos; text is the ids."""

    eos_id, pad_id = 2, 0

    @staticmethod
    def decode(ids):  # noqa: D102
        return " ".join(map(str, ids))


def config(ep: int):
    """The tiny model's config at expert-parallel size ``ep``."""
    return load_config(None, [*TINY, f"parallel.expert_parallel={ep}"])


def build(cfg, groups):
    """The model with weights that depend only on each parameter's global name."""
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    n_local = cfg.model.num_experts // cfg.parallel.expert_parallel
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            gname = mdl.global_param_name(name, ep_rank=groups.ep_rank, num_local_experts=n_local)
            gen = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def run_set(model, index: int, sync_group=None) -> dict:
    """Generate prompt set ``index`` with generator seed ``index``; the batch as a dict."""
    batch = generate(
        model,
        PROMPT_SETS[index],
        PARAMS,
        tokenizer=Tokenizer(),
        generator=torch.Generator().manual_seed(index),
        sync_group=sync_group,
    )
    return {name: getattr(batch, name) for name in FIELDS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = config(args.ep)
    groups = parallel.initialize(cfg)
    model = build(cfg, groups)
    result = run_set(model, dist.get_rank(), sync_group=groups.ep)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        torch.save(gathered, args.out)
    parallel.destroy()


if __name__ == "__main__":
    main()
