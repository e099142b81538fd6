"""Shared pieces of the rollout tests (importable by name; conftest.py is not)."""

from __future__ import annotations

from vp2o.data.tokenizer import CharTokenizer

TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.moe_ffn_hidden_size=32",
    "model.vocab_size=64",
    "model.init_method_std=0.05",
]


def char_tokenizer(vocab_size: int) -> CharTokenizer:
    """Ids 0 pad, 1 bos, 2 eos, then one printable character per id up to vocab_size."""
    return CharTokenizer([chr(ord("!") + i) for i in range(vocab_size - 3)])
