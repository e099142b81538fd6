"""Teacher-forced log-probs of a batch: the learner's side of the behaviour log-probs.

:func:`sequence_logprobs` runs one forward of the model over the rollout layout, with the same
mask (:func:`vp2o.rollout.masks.attention_mask`) and the same temperature scaling as
:func:`vp2o.rollout.generate`, and takes log p(x_s | x_<s) from megatron's own (vocab-parallel)
cross-entropy with labels shifted by one. With the weights that generated the batch it equals the
recorded behaviour log-probs (fp32: within 1e-4, tested).

Temperature enters as a forward hook on ``output_layer`` that divides the logits by ``T_lp``
inside the model, in generation and here alike, so both round the same way in bf16 and megatron's
cross-entropy (which never gathers the vocabulary under tensor parallelism) sees tempered logits.

Glossary: N rows, S columns, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vp2o.rollout.masks import attention_mask
from vp2o.rollout.sampling import logprob_temperature
from vp2o.rollout.types import RolloutBatch


@contextlib.contextmanager
def scoring(model: torch.nn.Module) -> Iterator[None]:
    """A forward that only reads: eval mode (no auxiliary losses or training statistics
    recorded) and no autograd; the model's mode is put back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's ``output_layer`` (through DDP / Float16Module wrappers); None off the last
    pipeline stage."""
    for name, module in model.named_modules():
        if name == "output_layer" or name.endswith(".output_layer"):
            return module
    return None


@contextlib.contextmanager
def temperature_scaled(model: torch.nn.Module, temperature: float) -> Iterator[None]:
    """Within the block the model's logits are divided by ``temperature`` (> 0)."""
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature}: expected > 0 (use logprob_temperature)")
    layer = output_layer(model)
    if temperature == 1.0 or layer is None:
        yield
        return

    def hook(module, args, output):
        logits, bias = output
        return logits / temperature, bias

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_attention_backend(model: torch.nn.Module) -> None:
    """Refuse attention modules that would ignore the padding mask.

    megatron's local ``DotProductAttention`` applies the boolean mask it is given. The
    transformer-engine attention uses its layer's ``attn_mask_type`` (causal, and ``no_mask`` in
    a static-cache decode step) and ignores it, so left-pad keys would be attended.

    Raises:
        NotImplementedError: a core attention other than megatron's local one.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for name, module in model.named_modules():
        if name.endswith("core_attention") and not isinstance(module, DotProductAttention):
            raise NotImplementedError(
                f"{name} is {type(module).__name__}: vp2o.rollout's padded batches need "
                "megatron's local DotProductAttention (model.transformer_impl=local); see "
                "docs/rollout.md for the transformer-engine path"
            )


def sequence_logprobs(
    model: torch.nn.Module,
    batch: RolloutBatch | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    temperature: float,
) -> torch.Tensor:
    """Teacher-forced log p(x_s | x_<s) at temperature T_lp, differentiable.

    Runs in the model's current mode and grad mode (the learner calls it with grad).

    Args:
        model: the megatron ``GPTModel`` (possibly wrapped in megatron DDP), last pipeline stage.
        batch: a :class:`RolloutBatch`, or ``(tokens, position_ids, valid)`` each [N, S].
        temperature: the sampling temperature (0 = greedy, scored at 1; see
            :func:`vp2o.rollout.sampling.logprob_temperature`): pass
            ``batch.logprob_temperature`` (or ``SamplingParams.temperature``) so the learner
            scores what the actor sampled.

    Returns:
        [N, S] float32 on the model's device: at a RolloutBatch's response positions (or, for a
        tuple, at every real token whose predecessor is real) the log-prob of the token at s
        predicted from s - 1; 0 elsewhere.
    """
    check_attention_backend(model)
    if isinstance(batch, RolloutBatch):
        tokens, pos, valid = batch.tokens, batch.position_ids, batch.valid
        scored = batch.response_mask
    else:
        tokens, pos, valid = batch
        scored = valid.clone()
        scored[:, 1:] &= valid[:, :-1]
        scored[:, 0] = False
    device = next(model.parameters()).device
    tokens, pos, valid, scored = (t.to(device) for t in (tokens, pos, valid, scored))
    labels = torch.roll(tokens, -1, dims=1)  # labels[:, s] = tokens[:, s + 1]
    with temperature_scaled(model, logprob_temperature(temperature)):
        nll = model(
            tokens, pos, attention_mask(valid), labels=labels, padding_mask=~valid
        )  # [N, S]
    first = torch.zeros_like(nll[:, :1], dtype=torch.float32)  # column 0 has no predecessor
    logprobs = torch.cat([first, -nll[:, :-1].float()], dim=1)  # [N, S]
    return torch.where(scored, logprobs, torch.zeros_like(logprobs))
