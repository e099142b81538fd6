"""Typed data boundaries of the RL loop.

Glossary: N sequences in a rollout batch (prompts x group size G), S the padded sequence length
(prompt + response), k top-k, Lm the number of MoE layers on this rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class RolloutBatch:
    """What the actors generated, with everything the learner needs to score it again.

    Layout: prompts are left-padded so that every prompt ends at column ``prompt_width - 1``;
    responses follow and are right-padded. The learner forward must use exactly ``tokens``,
    ``position_ids`` and ``valid`` (through the same attention-mask construction,
    :func:`vp2o.rollout.attention_mask`; :func:`vp2o.rollout.sequence_logprobs` does both) so that
    its log-probs equal the behaviour log-probs when the weights are the same. ``generate``
    returns every tensor on the CPU; S = ``prompt_width`` + the longest response.

    Attributes:
        tokens: [N, S] int64, pad where ``valid`` is False.
        position_ids: [N, S] int64, 0 at each sequence's first real token (0 at pads).
        valid: [N, S] bool, True at real (prompt or generated) tokens.
        response_mask: [N, S] bool, True at generated tokens (up to and including the stop
            token: EOS, a stop token id, or the token that completed a stop string).
        behavior_logprobs: [N, S] float32, log mu(tokens[n, s] | prefix) at response positions,
            0 elsewhere (the log-prob of the token *at* s, predicted from position s - 1), under
            the softmax of logits / ``logprob_temperature``, before top-k / top-p truncation.
        prompt_width: columns taken by the (left-padded) prompts.
        group_ids: [N] int64, index of the prompt each sequence answers (groups contiguous).
        routing_ids: [Lm, N, S, k] int64, the actor's top-k experts (global ids, ascending) for
            the token at each real position, prompt and response (-1 at pads). Empty tensor when
            not recorded.
        routing_gates: [Lm, N, S, k] float32, the matching gate values (0 at pads).
        completions: decoded response texts, N strings (the tokenizer drops EOS and pad).
        truncated: [N] bool, True when a response hit max_new_tokens without a stop.
        logprob_temperature: the temperature of ``behavior_logprobs`` (the sampling temperature;
            1.0 for greedy): pass it to the learner's ``sequence_logprobs``.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    valid: torch.Tensor
    response_mask: torch.Tensor
    behavior_logprobs: torch.Tensor
    prompt_width: int
    group_ids: torch.Tensor
    routing_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    routing_gates: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    completions: list[str] = field(default_factory=list)
    truncated: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.bool))
    logprob_temperature: float = 1.0

    @property
    def num_sequences(self) -> int:
        """N."""
        return self.tokens.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """[N] generated tokens per sequence."""
        return self.response_mask.sum(-1)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with every tensor on ``device`` (generation returns CPU tensors)."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if torch.is_tensor(value) else value
        return RolloutBatch(**moved)

    def select(self, index: torch.Tensor) -> RolloutBatch:
        """The sub-batch of the sequences in ``index`` (e.g. dynamic sampling, micro-batches)."""
        idx = index.tolist()
        return RolloutBatch(
            tokens=self.tokens[index],
            position_ids=self.position_ids[index],
            valid=self.valid[index],
            response_mask=self.response_mask[index],
            behavior_logprobs=self.behavior_logprobs[index],
            prompt_width=self.prompt_width,
            group_ids=self.group_ids[index],
            routing_ids=(
                self.routing_ids[:, index] if self.routing_ids.numel() else self.routing_ids
            ),
            routing_gates=(
                self.routing_gates[:, index] if self.routing_gates.numel() else self.routing_gates
            ),
            completions=[self.completions[i] for i in idx] if self.completions else [],
            truncated=self.truncated[index] if self.truncated.numel() else self.truncated,
            logprob_temperature=self.logprob_temperature,
        )
