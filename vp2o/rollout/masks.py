"""Batch layout and the attention mask shared by generation and the learner forward.

Layout (see :class:`vp2o.rollout.types.RolloutBatch`): prompts left-padded to ``prompt_width``
columns, responses right-padded after them. The mask lets a query at column q attend to the real
tokens at columns <= q. A pad query attends to itself only, so no softmax row is empty (its
output is never read). megatron's local ``DotProductAttention`` takes this boolean mask as is
(True = blocked, filled with -10000 before the softmax: exp underflows to exactly 0 in fp32).

Positions: megatron's RoPE indexes rotary angles by *column*, not by ``position_ids`` (these feed
only learned absolute embeddings). RoPE scores depend on position differences only, and left
padding shifts all of a row's real tokens by the same amount, so attention between real tokens is
the same as with per-sequence positions; ``position_ids`` (0 at each row's first real token) are
still built and passed for ``learned_absolute`` models.

Glossary: N rows, S columns (prompt + response), P prompt width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def attention_mask(valid: torch.Tensor, *, query_start: int = 0) -> torch.Tensor:
    """Causal + key-padding mask for queries at columns ``query_start .. S-1``.

    Args:
        valid: [N, S] bool, True at real tokens (keys are columns 0 .. S-1).
        query_start: first query column (0 for a full forward; the cache offset for a decode
            step, whose queries are the newest columns).

    Returns:
        [N, 1, S - query_start, S] bool, True where attention is blocked (megatron's convention).
    """
    num_keys = valid.shape[1]
    q = torch.arange(query_start, num_keys, device=valid.device).unsqueeze(1)  # [Sq, 1]
    k = torch.arange(num_keys, device=valid.device).unsqueeze(0)  # [1, S]
    allowed = (k <= q).unsqueeze(0) & valid.unsqueeze(1)  # [N, Sq, S]
    allowed = allowed | (k == q).unsqueeze(0)  # a pad query sees itself
    return ~allowed.unsqueeze(1)


def position_ids(valid: torch.Tensor) -> torch.Tensor:
    """[N, S] int64: 0 at each row's first real token, +1 per real token, 0 at left pads."""
    return (valid.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(
    prompts: Sequence[Sequence[int]], *, pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to a common width.

    Args:
        prompts: token lists, each non-empty.
        pad_id: id written at pad columns.
        width: columns (default: the longest prompt).

    Returns:
        tokens [N, width] int64 and valid [N, width] bool.
    """
    lengths = [len(p) for p in prompts]
    if any(n == 0 for n in lengths):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    width = max(lengths) if width is None else width
    if max(lengths) > width:
        raise ValueError(f"a prompt of {max(lengths)} tokens does not fit in width {width}")
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        valid[i, width - len(p) :] = True
    return tokens, valid
