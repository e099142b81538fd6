"""Reading the rollout batches that tests/reliability/train_hooks.py ``--dump`` writes, and the
first step's loss they imply (the tests that compare a multi-process run with one process).

At the first step the learner is the actor (ratio 1), so the token_mean policy loss of the
global batch is ``-sum_i A_i |y_i| / sum_i |y_i|`` over the union of the ranks' batches.
"""

from __future__ import annotations

from pathlib import Path

import torch

HOOKS = Path(__file__).resolve().parent / "reliability" / "train_hooks.py"


def pending(dump: Path, step: int = 0) -> list[dict]:
    """Every rank's rollout batch of ``step``, in rank order."""
    files = sorted(dump.glob(f"rollout_{step:04d}_rank*.pt"),
                   key=lambda f: int(f.stem.split("rank")[1]))
    return [torch.load(f, weights_only=True)["pending"] for f in files]


def first_step_loss(pendings: list[dict]) -> float:
    """-sum_i A_i |y_i| / sum_i |y_i| (token_mean at ratio 1)."""
    num = sum(float((p["advantages"] * p["batch"]["response_mask"].sum(1)).sum())
              for p in pendings)
    return -num / response_tokens(pendings)


def response_tokens(pendings: list[dict]) -> float:
    """Response tokens of the ranks' batches together."""
    return sum(float(p["batch"]["response_mask"].sum()) for p in pendings)


def rows(pendings: list[dict]) -> list[tuple]:
    """(completion, response tokens, reward, advantage, behaviour log-probs) per sequence, in
    rank order."""
    out = []
    for p in pendings:
        b = p["batch"]
        for n, text in enumerate(b["completions"]):
            tokens = b["tokens"][n][b["response_mask"][n]].tolist()
            logp = b["behavior_logprobs"][n][b["response_mask"][n]]
            out.append((text, tokens, float(p["rewards"][n]), float(p["advantages"][n]), logp))
    return out


def rows_in_global_order(pendings: list[dict], group: int) -> list[tuple]:
    """:func:`rows` of the ranks' batches in global prompt order: rank r's j-th prompt is global
    prompt j * W + r (``group`` sequences per prompt)."""
    per_rank = [rows([p]) for p in pendings]
    out = []
    for j in range(len(per_rank[0]) // group):
        for mine in per_rank:
            out += mine[j * group:(j + 1) * group]
    return out


def assert_same_rows(expected: list[tuple], got: list[tuple], *, logprob_atol: float,
                     logprob_rtol: float = 0.0) -> None:
    """Row by row: the same completion, response tokens and reward, the advantage within 1e-6,
    the behaviour log-probs within the tolerances."""
    assert len(got) == len(expected), (len(got), len(expected))
    pairs = enumerate(zip(expected, got, strict=True))
    for n, ((t1, y1, r1, a1, lp1), (t2, y2, r2, a2, lp2)) in pairs:
        assert (t1, y1, r1) == (t2, y2, r2), n
        assert abs(a1 - a2) <= 1e-6, (n, a1, a2)
        torch.testing.assert_close(lp1, lp2, rtol=logprob_rtol, atol=logprob_atol)
