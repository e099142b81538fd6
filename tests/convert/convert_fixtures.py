"""Tiny random HF MoE checkpoints built from configs with transformers (no download).

Weights are redrawn after construction (matrices ~ N(0, 0.1^2), norms ~ 1 + N(0, 0.1^2)), so that
every norm weight and every routing decision depends on the mapping being right; the default
init (norms = 1, std 0.02) would hide swapped norms and give near-uniform routing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

VOCAB = 96
SEQ = 12

# One tiny config per family, each exercising that family's distinguishing features.
HF_CONFIGS = {
    # GQA, explicit head_dim != hidden/heads, per-head qk-norm, renormalised top-k, one dense layer.
    "qwen3_moe": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        mlp_only_layers=[1],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        rope_theta=1000000.0,
        max_position_embeddings=256,
    ),
    # Shared expert + sigmoid gate, QKV bias, softmax before top-k (norm_topk_prob=False), tied.
    "qwen2_moe": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    ),
    # block_sparse_moe.gate / experts.{i}.w1,w2,w3, one KV head.
    "mixtral": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    ),
    # q/k RMSNorm over the whole projection (q_norm [32], k_norm [16]), GQA, softmax before
    # top-k (norm_topk_prob=False, OLMoE's default).
    "olmoe": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
    ),
}
SUPPORTED = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def build_hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised HF model of ``family`` (float32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{**HF_CONFIGS[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else 0.1 * noise)
    return model.to(dtype)


def tokens() -> torch.Tensor:
    """The fixed [2, SEQ] token batch every forward comparison uses."""
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def hf_logits(model) -> torch.Tensor:
    """HF logits [B, S, V] on :func:`tokens`."""
    with torch.no_grad():
        return model(tokens()).logits.float()


def copy_dir(src: Path, dst: Path) -> Path:
    """Copy a checkpoint directory (tests edit copies, never the session fixtures)."""
    shutil.copytree(src, dst)
    return dst
