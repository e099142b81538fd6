"""The embedded CPU demo: ``make demo`` / ``vp2o demo``.

1. generate the built-in arithmetic task (held-out prompts disjoint from training) and train its
   sentencepiece tokenizer;
2. supervised warm start of the tiny MoE (4 layers, d=128, 8 experts, top-2) to a partial
   held-out accuracy;
3. GRPO and VP2O from that same checkpoint, same seed, same budget (learner steps);
4. ``runs/demo/report.md`` with the held-out accuracy table, routing diagnostics and plots.

Every phase is a normal vp2o job (the same code as ``vp2o sft`` / ``vp2o train``), run one after
the other in this process. The settings below are the demo's; both RL modes share them.
"""

from __future__ import annotations

import time
from pathlib import Path

from vp2o.config import Config, load_config

MODEL = [
    "model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=256", "model.num_experts=8",
    "model.moe_router_topk=2", "model.moe_ffn_hidden_size=128", "model.vocab_size=64",
    "model.max_position_embeddings=64", "data.tokenizer_vocab_size=64",
    "data.num_train_prompts=4000", "data.num_eval_prompts=1000",
    "reward.name=exact", "reward.workers=1", "train.wandb_mode=offline",
]
SFT = ["sft.steps=600", "sft.batch_size=64", "sft.lr=3e-3"]
# One learner step per rollout batch in both modes (GRPO's default; VP2O's default is up to 4):
# at an equal learner-step budget, reusing a batch for several steps gives a fraction of the
# fresh samples, and on this task that cost both modes their gain (docs/results.md).
RL = [
    "train.steps=300", "rollout.prompts_per_step=64", "rollout.group_size=8",
    "rollout.max_new_tokens=6", "rollout.temperature=1.0", "rollout.micro_batch_size=512",
    "train.updates_per_rollout=1",
    "optimizer.lr=1e-4", "optimizer.warmup_steps=0", "optimizer.decay_style=constant",
    "optimizer.clip_grad=1.0", "optimizer.weight_decay=0.0", "train.eval_every=0",
]


def demo_config(phase: str, root: Path, extra: list[str] | None = None) -> Config:
    """The config of one demo phase (``sft``, ``grpo`` or ``vp2o``)."""
    overrides = [*MODEL, f"train.run_dir={root / phase}"]
    if phase == "sft":
        overrides += SFT
    else:
        overrides += [
            *RL, f"algorithm={phase}",
            f"data.tokenizer_path={root / 'sft' / 'tokenizer.model'}",
            f"train.init_checkpoint={root / 'sft' / 'checkpoints'}",  # its newest checkpoint
            "train.resume=never",
        ]
    return load_config(None, [*overrides, *(extra or [])])


def run_demo(root: Path = Path("runs/demo"), extra: list[str] | None = None, log=print) -> Path:
    """Run all phases; returns the report path."""
    from vp2o.report import write_report
    from vp2o.sft import sft
    from vp2o.train import train

    t0 = time.perf_counter()
    results = {}
    for phase in ("sft", "grpo", "vp2o"):
        t = time.perf_counter()
        cfg = demo_config(phase, root, extra)
        log(f"== {phase}: {cfg.train.run_dir}")
        result = sft(cfg) if phase == "sft" else train(cfg)
        results[phase] = result
        log(f"== {phase}: held-out accuracy {result['held_out_accuracy']:.3f} "
            f"({time.perf_counter() - t:.0f}s)")
    report = write_report(root, {p: root / p for p in ("sft", "grpo", "vp2o")})
    log(f"== report: {report} (total {time.perf_counter() - t0:.0f}s)")
    for phase, result in results.items():
        log(f"{phase:>5}: held-out accuracy {result['held_out_accuracy']:.3f}")
    return report
