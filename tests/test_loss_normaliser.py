"""The trainer's loss normaliser (``Learner.loss_normaliser`` + ``micro_batches``): summed over
micro-batches, the aggregated loss is the whole batch's loss for every aggregation, with the
normaliser each one names (token count, non-empty sequences, or B x L_max with L_max the
generation limit for Dr. GRPO). Checked against explicit loops. The data-parallel half (shares
summed over ranks) is checked end to end in tests/e2e/test_scaleout.py."""

from __future__ import annotations

import pytest
import torch

from vp2o.algo import grpo
from vp2o.config import load_config
from vp2o.experience import PendingBatch, micro_batches
from vp2o.learner import loss_normaliser
from vp2o.rollout.types import RolloutBatch

N, S, MAX_NEW = 8, 10, 7


def _by_loop(values: torch.Tensor, mask: torch.Tensor, aggregation: str) -> float:
    rows = [[float(v) for v, keep in zip(values[i], mask[i], strict=True) if keep]
            for i in range(N)]
    nonempty = [r for r in rows if r]
    if aggregation == "token_mean":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if aggregation == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in nonempty) / len(nonempty)
    if aggregation == "seq_mean_token_sum":
        return sum(sum(r) for r in nonempty) / len(nonempty)
    assert aggregation == "seq_mean_token_sum_norm"
    return sum(map(sum, rows)) / (N * MAX_NEW)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS.names())
def test_micro_batches_sum_to_the_whole_batch_loss(init_parallel, aggregation):
    cfg = load_config(None, [f"loss.aggregation={aggregation}",
                             f"rollout.max_new_tokens={MAX_NEW}"])
    groups = init_parallel(cfg)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(N, S, generator=gen) > 0.5
    mask[2] = False  # a sequence without response tokens (e.g. filtered)
    batch = RolloutBatch(
        tokens=torch.zeros(N, S, dtype=torch.long),
        position_ids=torch.zeros(N, S, dtype=torch.long),
        valid=torch.ones(N, S, dtype=torch.bool), response_mask=mask,
        behavior_logprobs=torch.zeros(N, S), prompt_width=2,
        group_ids=torch.arange(N) // 4,
    )
    pending = PendingBatch(batch=batch, advantages=torch.randn(N, generator=gen),
                           rewards=torch.zeros(N))
    values = torch.randn(N, S, generator=gen, dtype=torch.float64)
    mbs = micro_batches(pending, 3, torch.device("cpu"), loss_normaliser(pending, cfg, groups))
    assert len(mbs) == 3
    got, start = 0.0, 0
    for mb in mbs:
        part = mb["batch"].response_mask
        rows = slice(start, start + part.shape[0])
        got += float(grpo.aggregate(values[rows], part, aggregation=aggregation,
                                    denominator=mb["denominator"].double()))
        start += part.shape[0]
    assert got == pytest.approx(_by_loop(values, mask, aggregation), rel=1e-6)


def test_a_share_without_response_tokens_counts_zero():
    """A rank whose responses were all filtered adds nothing to the global count (the trainer
    clamps the total, not each share)."""
    empty = torch.zeros(3, 4, dtype=torch.bool)
    assert float(grpo.batch_normaliser(empty, aggregation="token_mean")) == 0.0
    assert float(grpo.batch_normaliser(empty, aggregation="seq_mean_token_mean")) == 0.0
    assert float(grpo.batch_normaliser(empty, aggregation="seq_mean_token_sum_norm",
                                       max_len=5)) == 15.0


def test_an_aggregation_without_a_normaliser_is_named():
    with pytest.raises(ValueError, match="loss aggregation"):
        grpo.batch_normaliser(torch.ones(2, 3), aggregation="nope")
