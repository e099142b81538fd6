"""The training prompts as one stream that the data-parallel ranks share.

The stream is the sequence of global sample indices 0, 1, 2, ... Index ``g`` is the row
``order_e[g % N]`` of epoch ``e = g // N``, where ``order_e`` is a permutation of the ``N`` rows
seeded by ``(seed, e)``.

Every rank of a data-parallel group of ``W`` ranks calls ``take(n)`` with the same ``n`` (its share
of one step's prompts). The call consumes the next ``n * W`` global indices ``[c, c + n * W)``,
``c`` being the number of prompts all ranks consumed before it, and rank ``r`` takes the strided
slice ``c + i * W + r`` for ``i < n``. Hence:

- the prompts of one step over all ranks are ``[c, c + n * W)``, the same for every ``W`` that has
  the same global batch ``n * W`` (with ``W = 1``, the rows in epoch order);
- the state is ``c``, the same number on every rank, so a run saved under one ``W`` and resumed
  under another continues at the same prompt: no prompt is skipped or repeated.

A call costs ``O(n)``, plus ``O(N)`` once per epoch it enters (the permutation of the epoch is
built once and kept).
"""

from __future__ import annotations

import random

__all__ = ["PromptRows", "PromptStream"]


class PromptRows(list):
    """The prompts of one ``take`` (a list of rows), with their global sample indices
    (``indices``, one per row): what a prompt's sampling seed is derived from, so that its
    responses are the same under any data-parallel layout."""

    def __init__(self, rows: list[dict], indices: list[int]) -> None:
        super().__init__(rows)
        self.indices = indices


def epoch_order(seed: int, epoch: int, num_rows: int) -> list[int]:
    """The order of the rows in ``epoch``: a permutation of ``range(num_rows)``, seeded by
    ``(seed, epoch)``. O(num_rows): ``PromptStream`` calls it once per epoch."""
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class PromptStream:
    """The training prompts of one data-parallel rank, in a per-epoch shuffled order (see the
    module docstring for which global indices rank ``rank`` of ``world`` takes).

    Args:
        rows: the training rows (non-empty); the same list, in the same order, on every rank.
        seed: the shuffle seed.
        rank: this rank's index in its data-parallel group.
        world: the data-parallel size.

    Attributes:
        consumed: global sample indices consumed by all ranks together (the checkpoint state).
    """

    def __init__(self, rows: list[dict], *, seed: int, rank: int, world: int) -> None:
        if not rows:
            raise ValueError("PromptStream: no rows")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"PromptStream: rank {rank} of world {world}: expected 0 <= rank < "
                             "world")
        self.rows, self.seed, self.rank, self.world = rows, seed, rank, world
        self.consumed = 0
        self._epoch: int | None = None  # the epoch whose order is cached
        self._order: list[int] = []

    def _row(self, index: int) -> dict:
        epoch, offset = divmod(index, len(self.rows))
        if epoch != self._epoch:  # indices only grow: one build per epoch entered
            self._order = epoch_order(self.seed, epoch, len(self.rows))
            self._epoch = epoch
        return self.rows[self._order[offset]]

    def take(self, n: int) -> PromptRows:
        """This rank's next ``n`` prompts: global indices ``consumed + i * world + rank``
        (``i < n``). Every rank must call it with the same ``n``; the call advances ``consumed``
        by ``n * world``."""
        if n < 0:
            raise ValueError(f"PromptStream.take: n = {n}: expected >= 0")
        indices = [self.consumed + i * self.world + self.rank for i in range(n)]
        rows = [self._row(g) for g in indices]
        self.consumed += n * self.world
        return PromptRows(rows, indices)

    def state_dict(self) -> dict:
        """``{"consumed", "seed", "num_rows"}``: the same on every rank, independent of the
        data-parallel size (store one copy)."""
        return {"consumed": self.consumed, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state["consumed"]``, under this stream's data-parallel size.

        Also accepts the per-rank count of earlier checkpoints, ``{"position": p}`` with
        optionally ``"world"`` (the data-parallel size that wrote it; this stream's when absent):
        ``consumed = p * world``.

        Raises:
            ValueError: the state is of another seed or number of rows (it would continue
                another order), or has neither field.
        """
        if "consumed" in state:
            consumed = int(state["consumed"])
        elif "position" in state:
            consumed = int(state["position"]) * int(state.get("world", self.world))
        else:
            raise ValueError(f"PromptStream state {state!r}: expected 'consumed' (or the "
                             "per-rank 'position' of earlier checkpoints)")
        for key, mine in (("seed", self.seed), ("num_rows", len(self.rows))):
            if key in state and state[key] != mine:
                raise ValueError(f"PromptStream state {key} = {state[key]!r}: this stream has "
                                 f"{mine!r}; resuming would continue another prompt order")
        if consumed < 0:
            raise ValueError(f"PromptStream state consumed = {consumed}: expected >= 0")
        self.consumed = consumed
