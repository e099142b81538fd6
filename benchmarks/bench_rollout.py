"""Generated tokens/s of both rollout engines side by side (fp32, alternating rounds), and the
vLLM weight sync's time and bandwidth.

    .venv/bin/python benchmarks/bench_rollout.py                      # both shapes, issue sizes
    .venv/bin/python benchmarks/bench_rollout.py --shapes demo --prompts 8 --group 2 \
        --new-tokens 16 --rounds 2                                    # a quick look

Shapes: ``demo`` (the demo's model: 4 layers, d=128, 8 experts) with 64 prompts x 8 samples and
128 new tokens; ``large`` (d=1024, 16 experts, 8 layers) with 16 prompts x 8 and 256 new tokens.
Each shape runs in its own process (one vLLM engine per process). Random weights: responses end
at EOS at random, so the rate counts the tokens each engine actually generated. The last line is
``rollout speedup vllm/megatron: X.XX`` of the last shape run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
import warnings

warnings.filterwarnings("ignore")

SHAPES = {
    "demo": {
        "model": ["model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4",
                  "model.num_query_groups=2", "model.ffn_hidden_size=256",
                  "model.num_experts=8", "model.moe_router_topk=2",
                  "model.moe_ffn_hidden_size=128", "model.vocab_size=64"],
        "prompts": 64, "group": 8, "new_tokens": 128,
    },
    "large": {
        "model": ["model.num_layers=8", "model.hidden_size=1024", "model.num_attention_heads=8",
                  "model.num_query_groups=4", "model.ffn_hidden_size=2048",
                  "model.num_experts=16", "model.moe_router_topk=2",
                  "model.moe_ffn_hidden_size=512", "model.vocab_size=64"],
        "prompts": 16, "group": 8, "new_tokens": 256,
    },
}


def run_shape(name: str, args) -> dict:
    """Both engines on one shape in this process; returns the measured numbers."""
    import torch

    from vp2o import engines
    from vp2o.config import load_config
    from vp2o.console import quiet_third_party_warnings
    from vp2o.data.tokenizer import CharTokenizer
    from vp2o.mcore import model as mdl
    from vp2o.mcore import parallel, vp2o_moe
    from vp2o.rollout import SamplingParams
    from vp2o.rollout.megatron_engine import MegatronEngine

    quiet_third_party_warnings()
    shape = SHAPES[name]
    prompts_n = args.prompts or shape["prompts"]
    group = args.group or shape["group"]
    new = args.new_tokens or shape["new_tokens"]
    cfg = load_config(None, [
        *shape["model"], "model.params_dtype=fp32", "rollout.engine=vllm",
        f"rollout.max_new_tokens={new}", f"rollout.max_model_len={new + 64}",
        f"rollout.max_num_seqs={min(256, prompts_n * group)}", "model.max_position_embeddings="
        f"{max(4096, new + 64)}",
    ])
    parallel.initialize(cfg, seed=0)
    torch.manual_seed(0)
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    tok = CharTokenizer([chr(ord("!") + i) for i in range(cfg.model.vocab_size - 3)])
    s = types.SimpleNamespace(cfg=cfg, model=model, tokenizer=tok, closers=[])
    t0 = time.perf_counter()
    vllm_engine = engines.rollout_engine(s)
    start_s = time.perf_counter() - t0
    held = engines._ENGINES[model]
    synced = [engines.sync_weights(s, held) for _ in range(args.syncs)]
    syncs = [x["perf/sync_s"] for x in synced]
    nbytes = synced[-1]["perf/sync_bytes"]  # what the engine received
    mega = MegatronEngine(model, tok)
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, cfg.model.vocab_size, (12,), generator=g).tolist()]
               for _ in range(prompts_n)]
    params = SamplingParams(temperature=1.0, max_new_tokens=new, group_size=group)
    rates = {"megatron": [], "vllm": []}
    for r in range(args.rounds):
        for label, engine in (("megatron", mega), ("vllm", vllm_engine)):
            gens = [torch.Generator().manual_seed(1000 * r + i) for i in range(prompts_n)]
            t0 = time.perf_counter()
            batch = engine.generate(prompts, params, generator=gens)
            rates[label].append(float(batch.response_lengths.sum()) / (time.perf_counter() - t0))
    engines.close_engine(s)
    parallel.destroy()
    med = {k: statistics.median(v) for k, v in rates.items()}
    sync = statistics.median(syncs)
    return {"shape": name, "prompts": prompts_n, "group": group, "new_tokens": new,
            "megatron_tok_s": med["megatron"], "vllm_tok_s": med["vllm"],
            "vllm_start_s": start_s, "sync_s": sync, "model_mb": nbytes / 2**20,
            "sync_gb_s": nbytes / sync / 1e9, "speedup": med["vllm"] / med["megatron"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["demo", "large"], choices=list(SHAPES))
    ap.add_argument("--prompts", type=int, default=0, help="0: the shape's")
    ap.add_argument("--group", type=int, default=0, help="0: the shape's")
    ap.add_argument("--new-tokens", type=int, default=0, help="0: the shape's")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one shape here, print JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_shape(args.one, args)), flush=True)
        return
    last = None
    for name in args.shapes:
        cmd = [sys.executable, __file__, "--one", name, "--rounds", str(args.rounds),
               "--syncs", str(args.syncs), "--prompts", str(args.prompts),
               "--group", str(args.group), "--new-tokens", str(args.new_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{name}: failed\n{out.stderr[-3000:]}")
        res = json.loads(lines[-1][len("RESULT "):])
        print(f"{name}: {res['prompts']} prompts x {res['group']}, {res['new_tokens']} new tokens: "
              f"megatron {res['megatron_tok_s']:.1f} tok/s, vllm {res['vllm_tok_s']:.1f} tok/s; "
              f"vLLM start {res['vllm_start_s']:.1f} s; sync {res['sync_s']:.2f} s for "
              f"{res['model_mb']:.1f} MiB ({res['sync_gb_s']:.3f} GB/s)")
        last = res
    print(f"rollout speedup vllm/megatron: {last['speedup']:.2f}")


if __name__ == "__main__":
    main()
