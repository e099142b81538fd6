"""Peak memory of the streaming HF <-> megatron-core conversion on a synthetic multi-GB checkpoint.

    .venv/bin/python benchmarks/bench_convert.py                 # ~2 GB bf16 Qwen3-MoE, temp dir
    .venv/bin/python benchmarks/bench_convert.py --gb 8 --dir /scratch/bench --keep

Writes a synthetic Qwen3-MoE HF checkpoint (random bf16 weights, 1 GB safetensors shards, written
tensor by tensor), then runs ``hf_to_mcore`` and ``mcore_to_hf`` each in a fresh subprocess. For
each direction it prints the wall time, the peak RSS (``VmHWM``), the peak anonymous RSS
(``RssAnon`` sampled every 5 ms: the memory the process holds, without file pages the kernel can
drop), the RSS after imports (torch + megatron-core + transformers), and the ratios
peak / largest tensor and (peak - after imports) / largest tensor. The largest tensor is the
embedding (vocab x d); the checkpoint size is ``--gb``. Finally it checks that the round trip is
bit-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
import torch, transformers, megatron.core  # noqa: F401
from vp2o.convert import hf_to_mcore, mcore_to_hf
from vp2o.convert import convert as _c, mcore_io as _m  # noqa: F401
base = status()
peak_anon = [base["RssAnon"]]
stop = False
def sample():
    while not stop:
        peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
        time.sleep(0.005)
t = threading.Thread(target=sample, daemon=True); t.start()
start = time.perf_counter()
direction, src, dst = sys.argv[1:4]
if direction == "hf-to-mcore":
    r = hf_to_mcore(src, dst)
else:
    r = mcore_to_hf(src, dst, max_shard_bytes=10**9)
seconds = time.perf_counter() - start
stop = True; t.join()
end = status()
print(json.dumps({"seconds": seconds, "base_rss": base["VmRSS"], "base_anon": base["RssAnon"],
                  "peak_rss": end["VmHWM"], "peak_anon": peak_anon[0],
                  "largest": r.largest_tensor_bytes, "total": r.total_bytes}))
"""


def qwen3_shape(target_bytes: float) -> dict:
    """A Qwen3-MoE-like config (bf16) whose checkpoint is about ``target_bytes``."""
    d, f, experts, vocab, heads, kv, hd = 1024, 512, 64, 32768, 16, 4, 64
    per_layer = 2 * (experts * 3 * d * f + d * hd * (heads + 2 * kv) + heads * hd * d + experts * d)
    fixed = 2 * (2 * vocab * d)
    layers = max(1, math.ceil((target_bytes - fixed) / per_layer))
    return dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=4 * d,
        moe_intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        num_experts=experts,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        torch_dtype="bfloat16",
    )


def write_synthetic(hf_dir: Path, config: dict) -> None:
    """Write the HF checkpoint tensor by tensor (never more than one tensor in memory)."""
    import torch

    from vp2o.convert import get_family
    from vp2o.convert.families import geometry, load_hf_config
    from vp2o.convert.hf_io import PlannedTensor, SafetensorsShardWriter

    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    family = get_family("qwen3_moe")
    m = family.model_config(load_hf_config(config), params_dtype="bf16")
    geo = geometry(m)
    d, hd, f = m.hidden_size, m.head_dim, m.moe_ffn_hidden_size
    shapes = {
        "model.embed_tokens.weight": (m.vocab_size, d),
        "lm_head.weight": (m.vocab_size, d),
        "model.norm.weight": (d,),
    }
    for rule in family.rules(m):
        for name in rule.hf:
            if name in shapes:
                continue
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                shapes[name] = (hd,)
            elif name.endswith("layernorm.weight"):
                shapes[name] = (d,)
            elif name.endswith("q_proj.weight"):
                shapes[name] = (geo.num_heads * hd, d)
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                shapes[name] = (geo.num_groups * hd, d)
            elif name.endswith("o_proj.weight"):
                shapes[name] = (d, geo.num_heads * hd)
            elif name.endswith("mlp.gate.weight"):
                shapes[name] = (m.num_experts, d)
            elif name.endswith(("gate_proj.weight", "up_proj.weight")):
                shapes[name] = (f, d)
            elif name.endswith("down_proj.weight"):
                shapes[name] = (d, f)
            else:  # pragma: no cover
                raise KeyError(name)
    plan = [PlannedTensor(n, s, torch.bfloat16) for n, s in shapes.items()]
    writer = SafetensorsShardWriter(hf_dir, plan, max_shard_bytes=10**9)
    gen = torch.Generator().manual_seed(0)
    for p in plan:
        writer.write(p.name, (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.finish()


def run_child(direction: str, src: Path, dst: Path) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, direction, str(src), str(dst)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        sys.exit(f"{direction} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def identical(a: Path, b: Path) -> bool:
    """Same tensor names, dtypes and bytes in two HF directories (read one tensor at a time)."""
    import torch

    from vp2o.convert.hf_io import HFReader

    with HFReader(a) as ra, HFReader(b) as rb:
        if ra.names() != rb.names():
            return False
        return all(torch.equal(ra.get(n), rb.get(n)) for n in sorted(ra.names()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="vp2o-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        config = qwen3_shape(args.gb * 1e9)
        t = time.perf_counter()
        write_synthetic(work / "hf", config)
        print(
            f"synthetic Qwen3-MoE: {config['num_hidden_layers']} layers x {config['num_experts']} "
            f"experts, d={config['hidden_size']}, bf16, written in {time.perf_counter() - t:.1f} s"
        )
        results = {
            "hf-to-mcore": run_child("hf-to-mcore", work / "hf", work / "mcore"),
            "mcore-to-hf": run_child("mcore-to-hf", work / "mcore", work / "hf2"),
        }
        gib, mib = 1024**3, 1024**2
        for direction, r in results.items():
            big = r["largest"]
            print(
                f"{direction}: {r['total'] / 1e9:.2f} GB in {r['seconds']:.1f} s, "
                f"largest tensor {big / mib:.0f} MiB\n"
                f"  peak RSS  {r['peak_rss'] / gib:.2f} GiB (after imports "
                f"{r['base_rss'] / gib:.2f}): peak / largest = {r['peak_rss'] / big:.1f}, "
                f"(peak - imports) / largest = {(r['peak_rss'] - r['base_rss']) / big:.1f}\n"
                f"  peak anon {r['peak_anon'] / gib:.2f} GiB (after imports "
                f"{r['base_anon'] / gib:.2f}): "
                f"(peak - imports) / largest = {(r['peak_anon'] - r['base_anon']) / big:.1f}"
            )
        print(f"round trip bit-identical: {identical(work / 'hf', work / 'hf2')}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
