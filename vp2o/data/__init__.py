"""Data: tokenizers (and, later, prompt datasets)."""

from vp2o.data.tokenizer import (
    TOKENIZERS,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    register_tokenizer,
)

__all__ = [
    "TOKENIZERS",
    "CharTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "register_tokenizer",
]
