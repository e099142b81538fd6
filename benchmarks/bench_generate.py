"""Generation time of the megatron engine (``vp2o.rollout.generate``) at the demo's shape, with
the decode-path options side by side in one process (alternating, median over rounds).

    .venv/bin/python benchmarks/bench_generate.py                  # demo shape
    .venv/bin/python benchmarks/bench_generate.py --profile        # + an operator profile

Variants (each a model built from the same seed; the VP2O layers as ``vp2o train`` builds them):
``megatron`` (megatron's forward in every step, ``generate(lean=False)``, the demo's model
options: grouped experts, sdpa attention), ``lean`` (``vp2o.rollout.lean_forward``, same
model), ``lean_routes`` (lean, the actors' routing recorded for §10 / router replay),
``megatron_local`` and ``lean_local`` (megatron's SequentialMLP experts and local attention).
The first variant is the base of the printed ratios; the last line is
``generate speedup lean/megatron: X.XX`` when both run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")

DEMO = [
    "model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=256", "model.num_experts=8",
    "model.moe_router_topk=2", "model.moe_ffn_hidden_size=128", "model.vocab_size=64",
    "model.max_position_embeddings=64",
]

FAST = ["model.moe_grouped_gemm=true", "model.core_attention=sdpa"]  # the demo's options
VARIANTS = {  # name -> (config overrides, lean forward, routing recorded)
    "megatron": (FAST, False, False),
    "lean": (FAST, True, False),
    "lean_routes": (FAST, True, True),
    "megatron_routes": (FAST, False, True),
    "megatron_local": ([], False, False),
    "lean_local": ([], True, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--variants", nargs="*", choices=sorted(VARIANTS),
                    default=["megatron", "lean", "lean_routes", "megatron_local", "lean_local"])
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    from vp2o.config import load_config
    from vp2o.console import quiet_third_party_warnings
    from vp2o.mcore import model as mdl
    from vp2o.mcore import parallel, vp2o_moe
    from vp2o.rollout import SamplingParams, generate

    quiet_third_party_warnings()
    cfgs = {v: load_config(None, [*DEMO, "algorithm=vp2o", *VARIANTS[v][0]])
            for v in args.variants}
    parallel.initialize(next(iter(cfgs.values())))
    models = {}
    for v, cfg in cfgs.items():
        torch.manual_seed(0)
        models[v] = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 64, (args.prompts, args.prompt_len), generator=gen).tolist()

    class _Tokens:
        eos_id, pad_id = 1, 0

        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    def run(v):
        lean, routes = VARIANTS[v][1:]
        params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens,
                                group_size=args.group, record_routing=routes)
        t0 = time.perf_counter()
        generate(models[v], prompts, params, tokenizer=_Tokens,
                 generator=torch.Generator().manual_seed(1), lean=lean)
        return time.perf_counter() - t0

    times = {v: [] for v in models}
    for r in range(args.rounds + 1):
        for v in (list(models) if r % 2 == 0 else list(models)[::-1]):
            t = run(v)
            if r:
                times[v].append(t)
    base = statistics.median(times[args.variants[0]])
    print(f"CPU, torch threads {torch.get_num_threads()}; demo shape; {args.prompts} prompts x "
          f"{args.group}, {args.prompt_len} prompt + {args.new_tokens} new tokens; median of "
          f"{args.rounds} alternating rounds")
    for v, ts in times.items():
        med = statistics.median(ts)
        print(f"{v:<16} generate {med * 1e3:8.1f} ms  ({med / base:.3f} x {args.variants[0]})")
    if "megatron" in times and "lean" in times:
        ratio = statistics.median(times["megatron"]) / statistics.median(times["lean"])
        print(f"generate speedup lean/megatron: {ratio:.2f}")
    if args.profile:
        for v in models:
            with torch.profiler.profile() as prof:
                run(v)
            print(f"\n== {v}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    parallel.destroy()


if __name__ == "__main__":
    main()
