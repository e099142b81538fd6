"""Router replay through megatron-core's ``RouterReplay`` (GRPO's "R3" option, method §1 baseline).

The actor forward records each MoE layer's top-k ids; the learner forward replays them, so the
learner scores the same experts the behaviour policy used (only the gate values are recomputed,
differentiably). Requires ``model.moe_enable_routing_replay=true`` at build time.

megatron keeps every ``RouterReplay`` in a process-wide list; these helpers act on the routers of
the given model only, so several models in one process (actor snapshot, reference) do not mix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplayAction


def _replays(model) -> list:
    replays = [m.router_replay for m in model.modules() if isinstance(m, TopKRouter)]
    if not replays or any(r is None for r in replays):
        raise RuntimeError(
            "router replay needs model.moe_enable_routing_replay=true when the model is built"
        )
    return replays


def record(model) -> None:
    """Make the next forwards record their top-k ids (each forward overwrites the last)."""
    for r in _replays(model):
        r.clear_indices()
        r.set_router_replay_action(RouterReplayAction.RECORD)


def recorded(model) -> list[torch.Tensor]:
    """The last forward's top-k ids per MoE layer, [T, k] int64 each, in layer order."""
    return [r.get_recorded_indices() for r in _replays(model)]


def replay(model, indices: list[torch.Tensor]) -> None:
    """Make the next forwards use ``indices`` (one [T, k] per MoE layer) as their top-k.

    With activation recompute the recompute pass replays the same indices.
    """
    replays = _replays(model)
    if len(indices) != len(replays):
        raise ValueError(f"got routing for {len(indices)} MoE layers, the model has {len(replays)}")
    for r, idx in zip(replays, indices, strict=True):
        r.clear_indices()
        r.set_target_indices(idx)
        r.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def stop(model) -> None:
    """Back to normal top-k routing."""
    for r in _replays(model):
        r.clear_indices()
        r.clear_router_replay_action()


@contextlib.contextmanager
def replaying(model, indices: list[torch.Tensor]) -> Iterator[None]:
    """:func:`replay` for the forwards inside the block, :func:`stop` after (also on error)."""
    replay(model, indices)
    try:
        yield
    finally:
        stop(model)
