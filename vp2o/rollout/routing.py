"""Recording the actor's MoE routing during generation, and handing it to router replay.

:class:`RoutingRecorder` puts a forward hook on every megatron ``TopKRouter`` of the model (plain
or :class:`vp2o.mcore.vp2o_moe.VP2ORouter`) while generation runs, and reads each forward's
selected experts from the router's own output ``(probs [T, E], routing_map [T, E])``: ids
ascending within a token and the gates passed to the experts, exactly as ``VP2ORouter`` keeps
them in ``last_routing`` (tested against it). Hooks are removed when the ``with`` block ends.

Rows of a router's input are megatron's token order ``s * B + b`` (sequence-major). With
sequence parallelism a rank routes only its slice of the sequence; recording then raises (TP = 1
only for now).

Glossary: Lm MoE layers on this rank, N rows, S columns, k top-k, T tokens of one forward.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter


def routing_from_router_output(
    probs: torch.Tensor, routing_map: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected expert ids (ascending) and their gates from a router's output.

    Args:
        probs: [T, E] gate values, 0 outside the selection.
        routing_map: [T, E] bool, True at the selected experts.
        topk: k.

    Returns:
        ids [T, k] int64 and gates [T, k] float32.
    """
    masked = probs.detach().float().masked_fill(~routing_map, -1.0)
    gates, ids = torch.topk(masked, topk, dim=-1)
    ids, order = torch.sort(ids, dim=-1)
    return ids, torch.gather(gates, 1, order)


class RoutingRecorder:
    """Keeps the last forward's routing of every MoE layer of ``model``, in layer order.

    Usage::

        with RoutingRecorder(model) as rec:
            model(...)
            ids, gates = rec.take(num_rows=B, num_cols=S)  # [Lm, B, S, k] each
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        if not self.routers:
            raise ValueError("record_routing: the model has no MoE router")
        self.topk = self.routers[0].topk
        self._last: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.routers)
        self._handles: list = []

    @property
    def num_layers(self) -> int:
        """Lm."""
        return len(self.routers)

    def __enter__(self) -> RoutingRecorder:
        for i, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def hook(module, args, output):
            probs, routing_map = output
            self._last[index] = routing_from_router_output(probs, routing_map, module.topk)

        return hook

    def take(self, *, num_rows: int, num_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last forward's routing as ids, gates [Lm, num_rows, num_cols, k] (then cleared).

        Raises:
            RuntimeError: a router did not run, or routed a different number of tokens (e.g.
                sequence parallelism splits the sequence across ranks).
        """
        ids, gates = [], []
        for i, rec in enumerate(self._last):
            if rec is None:
                raise RuntimeError(f"MoE router {i} did not run in the last forward")
            layer_ids, layer_gates = rec
            if layer_ids.shape[0] != num_rows * num_cols:
                raise RuntimeError(
                    f"MoE router {i} routed {layer_ids.shape[0]} tokens, expected "
                    f"{num_cols} x {num_rows}: routing recording needs the whole sequence on "
                    "each rank (no sequence parallelism)"
                )
            # [T, k] rows s * B + b -> [B, S, k]
            ids.append(layer_ids.view(num_cols, num_rows, -1).transpose(0, 1))
            gates.append(layer_gates.view(num_cols, num_rows, -1).transpose(0, 1))
        self._last = [None] * len(self.routers)
        return torch.stack(ids), torch.stack(gates)


def routing_in_batch_layout(records: list[torch.Tensor], b: int, s: int) -> torch.Tensor:
    """Per-layer [S * b, k] router rows (megatron order s * b + n) -> [layers, b, S, k]
    (the inverse of :func:`replay_indices`'s layout)."""
    return torch.stack([r.view(s, b, -1).transpose(0, 1) for r in records])


def replay_indices(routing_ids: torch.Tensor) -> list[torch.Tensor]:
    """Recorded ids as megatron's router replay wants them for a learner forward.

    For :func:`vp2o.mcore.router_replay.replay` on a forward over the same [N, S] batch layout:
    one [S * N, k] tensor per MoE layer in megatron token order (row s * N + n). Positions without
    a record (pads, -1) get experts 0 .. k-1: their outputs are never read.

    Args:
        routing_ids: [Lm, N, S, k] int64 (``RolloutBatch.routing_ids`` or a ``select`` of it).

    Returns:
        Lm tensors of shape [S * N, k], int64.
    """
    if routing_ids.dim() != 4:
        raise ValueError(
            f"routing_ids has shape {tuple(routing_ids.shape)}; expected [Lm, N, S, k] "
            "(generate with record_routing=True)"
        )
    k = routing_ids.shape[-1]
    filler = torch.arange(k, device=routing_ids.device).expand_as(routing_ids)
    ids = torch.where(routing_ids >= 0, routing_ids, filler)
    ids = ids.transpose(1, 2).reshape(routing_ids.shape[0], -1, k)  # [Lm, S * N, k]
    return list(ids.unbind(0))
