"""Worker for tests/convert/test_distributed.py: load a converted checkpoint under a layout.

    torchrun --nproc_per_node=2 tests/convert/dist_load_worker.py --ckpt DIR --ep 2 --out out.pt

Builds the model from ``DIR/config.yaml`` with expert parallelism ``--ep``, loads the dist
checkpoint written by ``vp2o convert hf-to-mcore`` (megatron reshards it onto this layout), runs
one forward pass on fixed tokens (the same on every rank) and saves, from rank 0, every rank's
logits and the number of experts each rank holds.
"""

import argparse

import torch
import torch.distributed as dist

from vp2o.config import load_config
from vp2o.convert import load_model_weights
from vp2o.mcore import model as mdl
from vp2o.mcore import parallel

BATCH, SEQ = 2, 12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(f"{args.ckpt}/config.yaml", [f"parallel.expert_parallel={args.ep}"])
    parallel.initialize(cfg)
    model = mdl.build_model(cfg)
    load_model_weights(model, args.ckpt)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ), generator=gen)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    with torch.no_grad():
        logits = model(tokens, pos, None)[..., : cfg.model.vocab_size]  # [B, S, V]
    experts = sum(
        ".local_experts." in n and n.endswith("linear_fc2.weight")
        for n, _ in model.named_parameters()
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"logits": logits, "tokens": tokens, "experts": experts})
    if dist.get_rank() == 0:
        torch.save(gathered, args.out)
    parallel.destroy()


if __name__ == "__main__":
    main()
