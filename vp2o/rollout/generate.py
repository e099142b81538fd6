"""Batched sampling from a megatron-core ``GPTModel`` with a static KV cache.

One prefill forward over the left-padded prompts, then one forward per generated column with our
boolean mask for causality and padding (RoPE is indexed by column, see :mod:`vp2o.rollout.masks`).
The forward is :class:`vp2o.rollout.lean_forward.LeanForward` (the model's weights through plain
tensor ops and a cache of its own; finished rows leave it) where it supports the model, else
megatron's own ``GPTModel.forward`` with its ``StaticInferenceContext`` passed as
``inference_context=`` (keys and values of earlier columns in its per-layer buffers; every row
advances to the end, a finished row fed pads, which no real token attends to).

Expert parallelism: a MoE layer's all-to-all pairs the forwards of all EP ranks, so every rank
must run the same number of forwards. With ``sync_group`` the ranks all-reduce (MAX) a "still
running" flag after each step and stop together; a rank whose rows are done keeps stepping with
pads. Without ``sync_group`` a rank stops as soon as its own rows are done (single process, or
EP = 1).

Glossary: N = prompts x G rows, P prompt width, M max new tokens, S = P + response columns,
Lm MoE layers on this rank, k top-k.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from vp2o.rollout.lean_forward import LeanForward, Unsupported
from vp2o.rollout.logprobs import check_attention_backend, scoring, temperature_scaled
from vp2o.rollout.masks import attention_mask, left_pad
from vp2o.rollout.routing import RoutingRecorder
from vp2o.rollout.sampling import SamplingParams, sample_next
from vp2o.rollout.types import RolloutBatch

logger = logging.getLogger(__name__)
_LEAN_REFUSALS: set[str] = set()


def _static_context(max_batch_size: int, max_sequence_length: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(max_batch_size, max_sequence_length)


def _check_layout(model) -> None:
    """Refuse layouts this loop does not handle (TP > 1 splits tokens or vocab, PP splits the
    forward)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, TransformerConfig):
            if cfg.tensor_model_parallel_size > 1 or cfg.pipeline_model_parallel_size > 1:
                raise NotImplementedError(
                    "vp2o.rollout.generate runs with tensor_parallel = pipeline_parallel = 1 "
                    f"(got TP={cfg.tensor_model_parallel_size}, "
                    f"PP={cfg.pipeline_model_parallel_size}); see docs/rollout.md"
                )
            return


def _lean_forward(model, num_rows: int, max_len: int) -> LeanForward | None:
    """The lean forward for ``model``, or None (and why, logged once per reason)."""
    try:
        return LeanForward(model, num_rows, max_len)
    except Unsupported as e:
        if str(e) not in _LEAN_REFUSALS:
            _LEAN_REFUSALS.add(str(e))
            logger.info("generation runs megatron's forward (the lean forward does not "
                        "support this model: %s)", e)
        return None


def _forward(model, tokens, position_ids, mask, context) -> torch.Tensor:
    """Logits [N, 1, V] of the newest column (megatron materialises only the last column)."""
    return model(tokens, position_ids, mask, inference_context=context, runtime_gather_output=True)


class _StopStrings:
    """Finds stop strings in the decoded tail of each response (only the tail can hold a new
    match: the previous step already checked everything before the newest token)."""

    def __init__(self, strings: tuple[str, ...], tokenizer) -> None:
        self.strings = strings
        self.tokenizer = tokenizer
        # A match ends in the newest token and spans at most len(s) characters; tokens decode to
        # >= 1 character except partial byte pieces, for which the margin leaves room.
        self.tail_tokens = max((len(s) for s in strings), default=0) + 8

    def __call__(self, tail: list[int]) -> bool:
        """Whether the decoded ``tail`` (the last ``tail_tokens`` of a response) has a match."""
        text = self.tokenizer.decode(tail)
        return any(s in text for s in self.strings)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    tokenizer,
    generator: torch.Generator | list[torch.Generator],
    progress: bool = False,
    sync_group: dist.ProcessGroup | None = None,
    lean: bool = True,
) -> RolloutBatch:
    """Sample ``params.group_size`` responses per prompt.

    Args:
        model: the megatron ``GPTModel`` of this rank (possibly wrapped), TP = PP = 1 or
            expert-parallel; put in eval mode for the call and restored after.
        prompts: token ids per prompt (each non-empty; lengths may differ).
        params: sampling parameters.
        tokenizer: has ``eos_id``, ``pad_id`` and ``decode(ids) -> str``.
        generator: the only source of randomness (on any device); or one generator per prompt
            (each drives its prompt's G rows), which makes a prompt's samples independent of the
            batch it shares, hence of the data-parallel layout.
        progress: show a tqdm bar over decode steps.
        sync_group: ranks that must run the same number of forwards (the EP group, or the
            whole world); None = decide locally. Not used with the lean forward.
        lean: run :class:`vp2o.rollout.lean_forward.LeanForward` where it supports the model
            (megatron's forward otherwise, logged once per reason); False = megatron's forward.

    Returns:
        A :class:`RolloutBatch` on the CPU, S = P + the longest response of this rank.
    """
    if not prompts:
        raise ValueError("generate: no prompts")
    check_attention_backend(model)
    _check_layout(model)
    device = next(model.parameters()).device
    group = params.group_size
    rows = [list(p) for p in prompts for _ in range(group)]
    num_rows, new = len(rows), params.max_new_tokens
    prompt_tokens, prompt_valid = left_pad(rows, pad_id=tokenizer.pad_id)
    width = prompt_tokens.shape[1]
    total = width + new
    pad_cols = (~prompt_valid).sum(-1, keepdim=True)  # [N, 1]

    tokens = torch.full((num_rows, total), tokenizer.pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((num_rows, total), dtype=torch.bool, device=device)
    tokens[:, :width] = prompt_tokens
    valid[:, :width] = prompt_valid
    # Position of column c in row n: c - pads_n (only read at real tokens).
    positions = (torch.arange(total).unsqueeze(0) - pad_cols).clamp_min(0).to(device)
    logprobs = torch.zeros((num_rows, total), dtype=torch.float32, device=device)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(
        sorted({tokenizer.eos_id, *params.stop_token_ids}), dtype=torch.long, device=device
    )
    stop_strings = _StopStrings(params.stop_strings, tokenizer) if params.stop_strings else None

    fast = _lean_forward(model, num_rows, total) if lean else None
    if fast is not None:
        sync_group = None  # no collective inside the lean forward: ranks may stop apart
    recorder = None
    if params.record_routing:
        recorder = RoutingRecorder(model) if fast is None else None
        layers, topk = ((recorder.num_layers, recorder.topk) if recorder is not None
                        else (fast.num_moe_layers, fast.topk))
        if layers == 0:
            raise ValueError("record_routing: the model has no MoE router")
        shape = (layers, num_rows, total, topk)
        routing_ids = torch.full(shape, -1, dtype=torch.long, device=device)
        routing_gates = torch.zeros(shape, dtype=torch.float32, device=device)

    def forward(start: int, end: int) -> torch.Tensor:
        """Feed columns start .. end-1 (the cache holds the earlier ones): logits [N, V] of
        column end-1, routing of the fed columns recorded when asked."""
        mask = attention_mask(valid[:, :end], query_start=start)
        if fast is not None:
            # decode steps feed the rows with a real token in the column; finished rows leave
            # the lean forward's cache, and their logits (never sampled from) stay 0
            active = valid[:, start] if end - start == 1 else None
            out = fast(tokens[:, start:end], positions[:, start:end], start, mask,
                       temperature=params.logprob_temperature, active=active)
            if params.record_routing:
                routing_ids[:, out.rows, start:end] = torch.stack([i for i, _ in out.routing])
                routing_gates[:, out.rows, start:end] = torch.stack([g for _, g in out.routing])
            if out.rows.numel() == num_rows:
                return out.logits
            logits = out.logits.new_zeros(num_rows, out.logits.shape[1])
            return logits.index_copy_(0, out.rows, out.logits)
        logits = _forward(model, tokens[:, start:end], positions[:, start:end], mask, context)
        if recorder is not None:
            ids, gates = recorder.take(num_rows=num_rows, num_cols=end - start)
            routing_ids[:, :, start:end] = ids
            routing_gates[:, :, start:end] = gates
        context.increment_sequence_len_offset(end - start)
        return logits[:, -1]

    context = _static_context(num_rows, total) if fast is None else None
    bar = tqdm(total=new, desc="generate", unit="step", disable=not progress, leave=False)
    try:
        with (
            scoring(model),  # eval mode, restored after
            # the lean forward divides its logits itself
            temperature_scaled(model, params.logprob_temperature if fast is None else 1.0),
            recorder or contextlib.nullcontext(),
        ):
            logits = forward(0, width)
            if context is not None:
                context.enable_decode_mode()
            for step in range(new):
                col = width + step
                token, logprob = sample_next(logits, params, generator)
                running = ~finished
                tokens[:, col] = torch.where(running, token, tokens[:, col])
                valid[:, col] = running
                logprobs[:, col] = torch.where(running, logprob, logprobs[:, col])
                stopped = running & torch.isin(token, stop_ids)
                if stop_strings is not None:
                    start = max(width, col + 1 - stop_strings.tail_tokens)
                    tails = tokens[:, start : col + 1].tolist()  # host sync: text to decode
                    check = (running & ~stopped).tolist()
                    hits = [c and stop_strings(t) for c, t in zip(check, tails, strict=True)]
                    stopped |= torch.tensor(hits, dtype=torch.bool, device=device)
                finished |= stopped
                bar.update(1)
                more = (~finished).any().to(torch.int32)
                if sync_group is not None:
                    dist.all_reduce(more, op=dist.ReduceOp.MAX, group=sync_group)
                last = step + 1 == new or not bool(more)  # host sync: one flag per step
                if last and not params.record_routing:
                    break
                # Feed the newest column: logits for the next one, or (after the last step)
                # only the routing of the final tokens.
                logits = forward(col, col + 1)
                if last:
                    break
    finally:
        bar.close()

    response_mask = valid.clone()
    response_mask[:, :width] = False
    lengths = response_mask.sum(-1)
    used = width + int(lengths.max())  # host sync
    truncated = ~finished
    responses = [tokens[n, width : width + int(lengths[n])].tolist() for n in range(num_rows)]
    positions = torch.where(valid, positions, torch.zeros_like(positions))
    batch = RolloutBatch(
        tokens=tokens[:, :used].cpu(),
        position_ids=positions[:, :used].cpu(),
        valid=valid[:, :used].cpu(),
        response_mask=response_mask[:, :used].cpu(),
        behavior_logprobs=logprobs[:, :used].cpu(),
        prompt_width=width,
        group_ids=torch.arange(len(prompts)).repeat_interleave(group),
        completions=[tokenizer.decode(r) for r in responses],
        truncated=truncated.cpu(),
        logprob_temperature=params.logprob_temperature,
    )
    if params.record_routing:
        keep = valid[:, :used].unsqueeze(0).unsqueeze(-1)  # [1, N, S, 1]
        batch.routing_ids = torch.where(keep, routing_ids[:, :, :used], -1).cpu()
        batch.routing_gates = torch.where(keep, routing_gates[:, :, :used], 0.0).cpu()
    return batch
