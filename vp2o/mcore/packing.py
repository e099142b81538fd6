"""Token-budget micro-batches: whole sequences packed back to back, no padding
(``train.max_tokens_per_microbatch``).

The rollout layout pads every row of a batch to its longest sequence (prompts left-padded,
responses right-padded; :mod:`vp2o.rollout.masks`). The learner's forward and backward need only
the real tokens, so with a token budget:

1. :func:`plan` sorts the sequences by real length, longest first, and places each in the first
   micro-batch whose total stays within the budget (first-fit decreasing); a sequence longer than
   the budget gets a micro-batch of its own (sequences are never split).
   :func:`equalise` splits micro-batches until every rank runs the same number of forwards (a MoE
   layer's all-to-all pairs the forwards of the expert-parallel ranks).
2. :func:`packed_logprobs` runs each micro-batch as ONE row ``[1, T]`` (T = its real tokens),
   sequence after sequence, with a block-diagonal causal mask (a token attends to the earlier
   tokens of its own sequence only), and scatters the per-token log-probs back into the padded
   ``[b, S]`` layout, so the policy loss, its statistics and the loss normaliser (the global
   batch's, ``vp2o.learner.loss_normaliser``) are computed exactly as without packing.

Positions: megatron's RoPE indexes rotary angles by column (``vp2o.rollout.masks``); a packed
sequence occupies consecutive columns, so the distances between its tokens, hence its attention
scores, are those of the padded layout (equal within fp32 rounding, tested); ``position_ids``
(learned absolute embeddings) are each sequence's own, 0 at its first token.

Router replay: the actors' routing ids are permuted into the packed token order
(:func:`packed_routing_ids`). Per-micro-batch quantities that are not sums over tokens (VP2O's
routing-variance and orthogonality losses are means over a micro-batch's tokens, megatron's
aux losses per micro-batch) follow the micro-batches' composition, as they follow
``rollout.micro_batch_size`` without packing.

The mask is one ``[1, 1, T, T]`` boolean tensor per micro-batch, shared by all layers; with
``model.core_attention = sdpa`` it is the only quadratic tensor of the attention (megatron's
local attention also keeps ``[heads, T, T]`` scores per layer).

Glossary: b sequences of a micro-batch, S padded columns, T packed tokens, Lm MoE layers.
"""

from __future__ import annotations

import torch

from vp2o.rollout.logprobs import check_attention_backend, temperature_scaled
from vp2o.rollout.sampling import logprob_temperature
from vp2o.rollout.types import RolloutBatch


def plan(lengths: list[int], budget: int) -> list[list[int]]:
    """Group sequences into micro-batches of at most ``budget`` tokens (first-fit decreasing).

    Args:
        lengths: real tokens (prompt + response) of each sequence.
        budget: tokens per micro-batch (>= 1).

    Returns:
        Micro-batches as lists of sequence indices, each list longest first; every index appears
        once. A sequence longer than ``budget`` is alone in its micro-batch.
    """
    if budget < 1:
        raise ValueError(f"token budget = {budget}: expected >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        n = lengths[i]
        for j, load in enumerate(loads):
            if load + n <= budget:
                bins[j].append(i)
                loads[j] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return bins


def equalise(bins: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """Split micro-batches until there are ``count`` of them (never more tokens in any).

    The micro-batch with the most tokens among those holding two or more sequences is split in
    two halves of about equal tokens, until the count is reached.

    Raises:
        ValueError: fewer sequences than ``count`` (an empty micro-batch cannot run a forward).
    """
    bins = [list(b) for b in bins]
    if count < len(bins):
        raise ValueError(f"cannot merge {len(bins)} micro-batches into {count}")
    while len(bins) < count:
        splittable = [b for b in bins if len(b) >= 2]
        if not splittable:
            raise ValueError(
                f"train.max_tokens_per_microbatch: this rank has {sum(map(len, bins))} sequences "
                f"but another rank runs {count} micro-batches, and every rank must run the same "
                "number of forwards (expert parallelism pairs them); lower the budget's spread "
                "across ranks or use rollout.micro_batch_size (train.max_tokens_per_microbatch=0)")
        big = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.remove(big)
        half = sum(lengths[i] for i in big) / 2
        first, acc = [], 0
        for i in big:  # longest first: the first half holds the long ones
            if first and acc + lengths[i] > half:
                break
            first.append(i)
            acc += lengths[i]
        bins += [first, big[len(first):]]
    return bins


def packed_layout(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each packed token comes from: ``(rows [T], cols [T])``, sequence after sequence,
    columns ascending within a sequence.

    Raises:
        ValueError: a row whose real tokens are not contiguous (the rollout layout's always are;
            packing would change the distances RoPE sees).
    """
    rows, cols = valid.nonzero(as_tuple=True)  # row-major: the packed order
    counts = valid.sum(-1)
    first = torch.where(counts > 0, valid.long().argmax(-1), 0)
    last = torch.where(counts > 0, valid.shape[1] - 1 - valid.flip(-1).long().argmax(-1), -1)
    if not bool(((last - first + 1).clamp_min(0) == counts).all()):  # sync
        raise ValueError("packing needs each sequence's real tokens in consecutive columns")
    return rows, cols


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """``[1, 1, T, T]`` bool, True where blocked (megatron's convention): a query attends to the
    keys at or before it with the same segment id (``segments [T]``, one id per sequence)."""
    t = segments.shape[0]
    pos = torch.arange(t, device=segments.device)
    allowed = (segments.unsqueeze(1) == segments.unsqueeze(0)) & (pos.unsqueeze(0)
                                                                 <= pos.unsqueeze(1))
    return ~allowed.view(1, 1, t, t)


def packed_routing_ids(batch: RolloutBatch) -> torch.Tensor:
    """The batch's routing ids ``[Lm, b, S, k]`` in the packed order, as ``[Lm, 1, T, k]``: a
    one-row batch that ``vp2o.rollout.replay_indices`` turns into megatron's token order."""
    rows, cols = packed_layout(batch.valid)
    return batch.routing_ids[:, rows, cols].unsqueeze(1)


def packed_logprobs(model: torch.nn.Module, batch: RolloutBatch, *,
                    temperature: float) -> torch.Tensor:
    """:func:`vp2o.rollout.sequence_logprobs` of ``batch`` computed on its packed row.

    One forward over the real tokens of all sequences, back to back, with a block-diagonal
    causal mask; the same result (within fp32 rounding) as the padded forward, differentiable.

    Returns:
        [b, S] float32: at response positions log p(x_s | x_<s) at temperature T_lp, 0 elsewhere.
    """
    check_attention_backend(model)
    device = next(model.parameters()).device
    batch = batch.to(device)
    rows, cols = packed_layout(batch.valid)
    tokens = batch.tokens[rows, cols].unsqueeze(0)  # [1, T]
    pos = batch.position_ids[rows, cols].unsqueeze(0)
    # labels[t] = tokens[t + 1]: at a sequence's last token that is the next sequence's first,
    # whose log-prob lands one column after a sequence's end, a position never scored.
    labels = torch.roll(tokens, -1, dims=1)
    padding = torch.zeros_like(tokens, dtype=torch.bool)
    with temperature_scaled(model, logprob_temperature(temperature)):
        nll = model(tokens, pos, block_causal_mask(rows), labels=labels,
                     padding_mask=padding)  # [1, T]
    b, s = batch.tokens.shape
    padded = nll.new_zeros((b, s), dtype=torch.float32).index_put((rows, cols), nll[0].float())
    first = torch.zeros_like(padded[:, :1])  # column 0 has no predecessor
    logprobs = torch.cat([first, -padded[:, :-1]], dim=1)  # [b, S]
    return torch.where(batch.response_mask, logprobs, torch.zeros_like(logprobs))
