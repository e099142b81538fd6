"""The rollout engine interface: what the trainer, ``vp2o eval`` and the demo generate with.

    engine = ENGINES.get(cfg.rollout.engine)(...)    # built by vp2o.engines.engine_for(session)
    engine.update_weights(named_hf_tensors)          # after the policy changed (no-op: megatron)
    batch = engine.generate(prompts, sampling, generator=gens)   # -> RolloutBatch

Two implementations are registered in :data:`ENGINES`: ``megatron``
(:class:`vp2o.rollout.megatron_engine.MegatronEngine`, the learner's own model through
:func:`vp2o.rollout.generate`) and ``vllm`` (:class:`vp2o.rollout.vllm_engine.VLLMEngine`, an
in-process ``vllm.LLM`` with its own copy of the weights). Both return the same
:class:`~vp2o.rollout.types.RolloutBatch` layout (left-padded prompts, right-padded responses),
so the learner cannot tell them apart except through ``exact`` (whether the behaviour log-probs
are the learner's own forward at the same weights, bit for bit up to reduction order).

Glossary: N = prompts x G rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch

from vp2o.registry import Registry
from vp2o.rollout.sampling import SamplingParams
from vp2o.rollout.types import RolloutBatch


@runtime_checkable
class RolloutEngine(Protocol):
    """An inference engine that samples rollouts and takes the learner's new weights.

    Attributes:
        name: the ``rollout.engine`` value.
        exact: True when the behaviour log-probs come from the learner's own model (no
            mismatch to correct).
        shares_weights: True when the engine reads the learner's parameters directly, so
            ``update_weights`` has nothing to do.
        returns_routes: whether ``generate`` can fill ``routing_ids`` / ``routing_gates``
            (``SamplingParams.record_routing``).
    """

    name: str
    exact: bool
    shares_weights: bool
    returns_routes: bool

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        *,
        generator: torch.Generator | Sequence[torch.Generator],
    ) -> RolloutBatch:
        """Sample ``sampling.group_size`` responses per prompt (token ids), on the CPU.

        ``generator`` is the only source of randomness: one generator, or one per prompt (a
        prompt's samples then do not depend on the batch it shares).
        """
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights, given by HF tensor name, in place (no disk, no second copy)."""
        ...

    def sleep(self) -> None:
        """Release what the engine holds between rollouts (KV cache, weights) where supported;
        a no-op otherwise."""
        ...

    def wake(self) -> None:
        """Undo ``sleep`` (a no-op where ``sleep`` is)."""
        ...


ENGINES: Registry[type] = Registry("rollout engine")
"""``rollout.engine`` name -> engine class (filled by the engine modules at import)."""


def prompt_seeds(
    generator: torch.Generator | Sequence[torch.Generator], num_prompts: int
) -> list[int]:
    """One sampling seed per prompt drawn from ``generator`` (one generator for all prompts, or
    one per prompt), for engines that take integer seeds instead of a torch generator."""
    gens = list(generator) if isinstance(generator, Sequence) else [generator] * num_prompts
    if len(gens) != num_prompts:
        raise ValueError(f"{len(gens)} generators for {num_prompts} prompts")
    return [int(torch.randint(0, 2**31 - 1, (), generator=g)) for g in gens]


def check_prompt_lengths(prompts: list[list[int]], max_new_tokens: int, max_model_len: int,
                         key: str = "rollout.max_model_len") -> None:
    """Refuse prompts that cannot fit ``max_new_tokens`` more tokens within ``max_model_len``
    before any generation starts (the message names ``key``)."""
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > max_model_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens: with rollout.max_new_tokens = {max_new_tokens} "
                f"it needs {key} >= {len(p) + max_new_tokens} (got {max_model_len}); raise "
                f"{key} or lower data.max_prompt_tokens"
            )


def batch_from_sequences(
    prompts: list[list[int]],
    responses: list[list[int]],
    logprobs: list[list[float]],
    *,
    group_size: int,
    pad_id: int,
    finished: list[bool],
    completions: list[str],
    logprob_temperature: float,
    routes: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> RolloutBatch:
    """A :class:`RolloutBatch` in the padded layout from per-row token lists.

    Args:
        prompts: one token list per prompt (each used by its ``group_size`` rows).
        responses: N = prompts x G response token lists (row n answers prompt n // G).
        logprobs: N lists, the behaviour log-prob of each response token.
        group_size: G.
        pad_id: the tokenizer's pad id.
        finished: N flags, False when a response hit the token limit without a stop.
        completions: N decoded responses.
        logprob_temperature: the temperature the learner scores at.
        routes: N (ids [T_n, Lm, k], gates [T_n, Lm, k]) with T_n <= prompt + response tokens
            (missing trailing positions stay -1 / 0); gates None where the engine returns ids
            only (the batch's ``routing_gates`` then stays empty:
            ``vp2o.learner.Learner.fills_actor_gates``).
    """
    n = len(responses)
    width = max(len(p) for p in prompts)
    longest = max((len(r) for r in responses), default=0)
    total = width + longest
    tokens = torch.full((n, total), pad_id, dtype=torch.long)
    valid = torch.zeros((n, total), dtype=torch.bool)
    response_mask = torch.zeros((n, total), dtype=torch.bool)
    positions = torch.zeros((n, total), dtype=torch.long)
    behaviour = torch.zeros((n, total), dtype=torch.float32)
    ids = gates = None
    if routes is not None:
        layers, k = routes[0][0].shape[1:]
        ids = torch.full((layers, n, total, k), -1, dtype=torch.long)
        if all(g is not None for _, g in routes):
            gates = torch.zeros((layers, n, total, k), dtype=torch.float32)
    for row, (resp, lps) in enumerate(zip(responses, logprobs, strict=True)):
        prompt = prompts[row // group_size]
        start = width - len(prompt)
        seq = list(prompt) + list(resp)
        end = start + len(seq)
        tokens[row, start:end] = torch.tensor(seq, dtype=torch.long)
        valid[row, start:end] = True
        positions[row, start:end] = torch.arange(len(seq))
        response_mask[row, width:end] = True
        behaviour[row, width:end] = torch.tensor(lps, dtype=torch.float32)
        if routes is not None:
            r_ids, r_gates = routes[row]
            t = min(r_ids.shape[0], len(seq))
            ids[:, row, start : start + t] = r_ids[:t].transpose(0, 1)
            if gates is not None:
                gates[:, row, start : start + t] = r_gates[:t].transpose(0, 1).float()
    batch = RolloutBatch(
        tokens=tokens,
        position_ids=positions,
        valid=valid,
        response_mask=response_mask,
        behavior_logprobs=behaviour,
        prompt_width=width,
        group_ids=torch.arange(len(prompts)).repeat_interleave(group_size),
        completions=list(completions),
        truncated=~torch.tensor(finished, dtype=torch.bool),
        logprob_temperature=logprob_temperature,
    )
    if routes is not None:
        batch.routing_ids = ids
        if gates is not None:
            batch.routing_gates = gates
    return batch
