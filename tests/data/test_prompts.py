"""vp2o.data.prompts: the prompt stream's order, its cost per take, and resuming under another
data-parallel size."""

from __future__ import annotations

import random

import pytest

from vp2o.data import prompts
from vp2o.data.prompts import PromptStream

ROWS = [{"prompt": f"p{i}"} for i in range(10)]


def _streams(world: int, rows=ROWS, seed: int = 3) -> list[PromptStream]:
    return [PromptStream(rows, seed=seed, rank=r, world=world) for r in range(world)]


def _step(streams: list[PromptStream], n: int) -> list[tuple[int, str]]:
    """One step on every rank: (global index, prompt) of all ranks, in global order."""
    taken = []
    for s in streams:
        rows = s.take(n)
        taken += zip(rows.indices, (r["prompt"] for r in rows), strict=True)
    return sorted(taken)


def _reference(seed: int, count: int, rows=ROWS) -> list[tuple[int, str]]:
    """The stream written from its definition: index g is row order_e[g % N] of epoch g // N."""
    out = []
    for g in range(count):
        epoch, offset = divmod(g, len(rows))
        order = list(range(len(rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append((g, rows[order[offset]]["prompt"]))
    return out


def test_one_process_reads_every_row_once_per_epoch_in_the_seeded_order():
    (s,) = _streams(1)
    taken = [_step([s], 4) for _ in range(6)]  # 24 prompts: epochs 0, 1 and part of 2
    flat = [x for step in taken for x in step]
    assert flat == _reference(3, 24)
    for epoch in range(2):
        assert sorted(p for _, p in flat[epoch * 10 : (epoch + 1) * 10]) == sorted(
            r["prompt"] for r in ROWS)
    assert [p for _, p in flat[:10]] != [p for _, p in flat[10:20]]  # reshuffled per epoch
    assert s.consumed == 24


@pytest.mark.parametrize("world", [2, 4])
def test_the_prompts_of_a_step_are_the_same_for_every_data_parallel_size(world):
    """The global batch (4 prompts) split over W ranks: each step's union is the one-process
    step, across epoch boundaries too; the ranks' slices are disjoint."""
    one = _streams(1)
    many = _streams(world)
    for _ in range(7):
        assert _step(many, 4 // world) == _step(one, 4)
    assert {s.consumed for s in many} == {28}


def test_rank_r_takes_the_strided_slice():
    streams = _streams(4)
    assert [s.take(2).indices for s in streams] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [s.take(1).indices for s in streams] == [[8], [9], [10], [11]]


@pytest.mark.parametrize("new_world", [1, 2, 4])
def test_resume_under_another_data_parallel_size_continues_the_sequence(new_world):
    """Saved at W = 2 after 3 steps of 4 prompts (12: the second epoch has begun), resumed at
    W = 1, 2 or 4: the next steps are exactly those of the uninterrupted run."""
    uninterrupted = _streams(1)
    expected = [_step(uninterrupted, 4) for _ in range(6)]
    first = _streams(2)
    before = [_step(first, 2) for _ in range(3)]
    state = first[0].state_dict()
    assert all(s.state_dict() == state for s in first)  # one copy serves every rank
    assert state == {"consumed": 12, "seed": 3, "num_rows": 10}
    resumed = _streams(new_world)
    for s in resumed:
        s.load_state_dict(dict(state))
    after = [_step(resumed, 4 // new_world) for _ in range(3)]
    assert before + after == expected


def test_old_checkpoints_per_rank_position():
    """Earlier checkpoints stored each rank's own count: consumed = position x the size that
    wrote it (this stream's size when it is not given)."""
    s = PromptStream(ROWS, seed=3, rank=1, world=2)
    s.load_state_dict({"position": 5})
    assert s.consumed == 10 and s.take(1).indices == [11]
    s.load_state_dict({"position": 5, "world": 4})
    assert s.consumed == 20


def test_a_state_of_another_order_is_refused():
    (s,) = _streams(1)
    with pytest.raises(ValueError, match="seed = 4: this stream has 3"):
        s.load_state_dict({"consumed": 8, "seed": 4, "num_rows": 10})
    with pytest.raises(ValueError, match="num_rows = 11: this stream has 10"):
        s.load_state_dict({"consumed": 8, "seed": 3, "num_rows": 11})
    with pytest.raises(ValueError, match="expected 'consumed'"):
        s.load_state_dict({})
    with pytest.raises(ValueError, match="no rows"):
        PromptStream([], seed=0, rank=0, world=1)
    with pytest.raises(ValueError, match="rank 2 of world 2"):
        PromptStream(ROWS, seed=0, rank=2, world=2)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_take_costs_the_batch_not_the_dataset(monkeypatch, world):
    """The permutation (the O(N) part) is built once per epoch entered, not once per prompt:
    10,000 rows, 50 steps of 8 prompts per rank stay inside epoch 0: one build per rank; a
    10-row set over 6 epochs: 6 builds per rank."""
    builds = []
    real = prompts.epoch_order

    def counting(seed, epoch, num_rows):
        builds.append(epoch)
        return real(seed, epoch, num_rows)

    monkeypatch.setattr(prompts, "epoch_order", counting)
    big = [{"prompt": str(i)} for i in range(10_000)]
    streams = _streams(world, rows=big)
    for _ in range(50):
        _step(streams, 8)
    assert builds == [0] * world
    builds.clear()
    streams = _streams(world)
    for _ in range(15):
        _step(streams, 4 // world)  # 60 prompts: epochs 0 to 5
    assert sorted(builds) == sorted(list(range(6)) * world)
