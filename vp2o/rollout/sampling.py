"""Sampling parameters and the per-step token choice (pure tensor functions).

The behaviour policy mu whose log-probs a rollout records is the model's softmax at the
log-prob temperature ``T_lp`` (:func:`logprob_temperature`: the sampling temperature, or 1 for
greedy decoding), *before* top-k / top-p truncation:

    log mu(x_s | x_<s) = log_softmax(z_s / T_lp)[x_s]        z_s: the model's logits at s - 1

Truncation only narrows where the sampler may go; the recorded log-prob stays that of the
untruncated tempered distribution, because that is what the learner can recompute with one
forward (:func:`vp2o.rollout.sequence_logprobs` at the same temperature), with or without
truncation. With aggressive top-p the recorded mu therefore under-states the probability of the
sampled token (the truncated distribution renormalises); the importance ratio the learner forms
is then the ratio of two untruncated distributions, as in verl and OpenRLHF.

Glossary: N rows (sequences), V vocabulary (padded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How :func:`vp2o.rollout.generate` samples.

    Attributes:
        temperature: softmax temperature T >= 0; 0 = greedy (argmax, log-probs at T = 1).
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose tempered
            probability reaches top_p (0 < top_p <= 1; 1 = off).
        top_k: keep the k most likely tokens (0 = off).
        max_new_tokens: generated tokens per sequence at most (>= 1).
        stop_token_ids: extra ids that end a sequence (the tokenizer's EOS always does); the
            stop token is part of the response.
        stop_strings: a sequence ends at the first generated token after which its decoded
            response contains one of these; that token is the last of the response.
        group_size: samples per prompt G (>= 1); the G rows of a prompt are contiguous.
        record_routing: record each MoE layer's top-k expert ids and gates for every token.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    group_size: int = 1
    record_routing: bool = False

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(str(s) for s in self.stop_strings)
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: expected >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: expected 0 < top_p <= 1 (1 = off)")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: expected >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens}: expected >= 1")
        if self.group_size < 1:
            raise ValueError(f"group_size = {self.group_size}: expected >= 1")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings: empty strings would stop every sequence at once")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax."""
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the recorded behaviour log-probs (pass it to the learner)."""
        return logprob_temperature(self.temperature)


def logprob_temperature(temperature: float) -> float:
    """T_lp: the sampling temperature, or 1.0 for greedy decoding (temperature 0)."""
    return float(temperature) if temperature > 0 else 1.0


def truncate_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k / top-p set to -inf.

    Args:
        logits: [N, V] float, already divided by the temperature.
        top_k: keep the k largest per row (0 = off).
        top_p: keep the smallest prefix of the sorted distribution whose mass reaches top_p
            (the token that crosses top_p is kept, so at least one token survives).

    Returns:
        [N, V] float, the filtered logits (a new tensor).
    """
    out = logits.clone()
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]  # [N, 1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)  # [N, V]
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row and return it with its behaviour log-prob.

    Sampling is an exponential race, ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` drawn from
    ``generator`` (on the generator's device), which picks v with probability p_v. Each row uses
    its own noise and the draw count does not depend on the values, so a row's token is a
    function of its logits and the generator state alone (rows finished earlier keep drawing).

    Args:
        logits: [N, V] logits already divided by ``params.logprob_temperature`` (any dtype).
        params: sampling parameters.
        generator: the only source of randomness: one generator for all rows, or a sequence of
            n generators for n equal blocks of contiguous rows (one per prompt: its G rows), so
            a prompt's samples do not depend on which other prompts share the batch.

    Returns:
        tokens [N] int64 and log mu(token) [N] float32 (untruncated, see the module docstring).
    """
    z = logits.float()  # [N, V]
    logprobs = torch.log_softmax(z, dim=-1)
    if params.greedy:
        tokens = torch.argmax(z, dim=-1)
    else:
        kept = truncate_logits(z, top_k=params.top_k, top_p=params.top_p)
        probs = torch.softmax(kept, dim=-1)
        gens = list(generator) if isinstance(generator, Sequence) else [generator]
        if z.shape[0] % len(gens):
            raise ValueError(f"{z.shape[0]} rows do not split into {len(gens)} generator blocks")
        noise = torch.empty(z.shape, device=gens[0].device, dtype=torch.float32)
        for block, gen in zip(noise.view(len(gens), -1, z.shape[-1]), gens, strict=True):
            block.exponential_(generator=gen)  # [N / n, V] per generator
        tokens = torch.argmax(probs / noise.to(z.device), dim=-1)
    return tokens, torch.gather(logprobs, 1, tokens.unsqueeze(1)).squeeze(1)
