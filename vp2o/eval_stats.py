"""The arithmetic of evaluation: pass@k, per-skill accuracy, routing specialisation, and the
history of evaluations over a run (no process group, no model: :mod:`vp2o.evaluate` feeds it).

Routing specialisation, per MoE layer, from the experts chosen for a set of tokens (each token
of skill ``s`` adds one count per expert of its top-k to ``counts[s, e]``; the joint
distribution is ``p(s, e) = counts / counts.sum()``, i.e. a token's skill and one of its k
experts drawn uniformly):

- ``mi_skill_expert = I(S; E) / H(S)`` in [0, 1]: 0 when the experts do not depend on the skill,
  1 when the expert identifies the skill (each skill has experts of its own). I is at most
  H(S), so the ratio reads as the fraction of the skill's uncertainty the routing removes. None
  with fewer than two skills (H(S) = 0).
- ``expert_entropy = H(E) / log(E)`` in [0, 1]: 1 when the experts are used equally, 0 when one
  expert takes every assignment.

Logarithms are natural; the ratios do not depend on the base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "EvalHistory",
    "mutual_information",
    "normalized_entropy",
    "normalized_mutual_information",
    "pass_at_k",
    "routing_counts",
    "routing_metrics",
    "scalar_metrics",
    "skill_accuracy",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al.):
    the chance that k of the n samples, drawn without replacement, hold a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def skill_accuracy(skills: Sequence[str | None], correct: Sequence[bool]) -> dict[str, float]:
    """``{"skill/<name>/accuracy": fraction correct}`` over the rows of each named skill (rows
    without a skill, None, are left out)."""
    totals: dict[str, list[int]] = {}
    for name, ok in zip(skills, correct, strict=True):
        if name is not None:
            t = totals.setdefault(name, [0, 0])
            t[0] += bool(ok)
            t[1] += 1
    return {f"skill/{name}/accuracy": t[0] / t[1] for name, t in sorted(totals.items())}


def routing_counts(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *,
                   num_labels: int, num_experts: int) -> torch.Tensor:
    """Skill-by-expert counts of routing assignments, per MoE layer.

    Args:
        ids: [Lm, N, S, k] expert ids (``RolloutBatch.routing_ids``; -1 at pads).
        mask: [N, S] bool, the tokens to count (e.g. ``RolloutBatch.response_mask``).
        labels: [N] int64, each row's skill index in ``[0, num_labels)``.
        num_labels: skills.
        num_experts: E.

    Returns:
        [Lm, num_labels, E] float64 counts (on the CPU): one per (token, selected expert).
    """
    lm, n, s, k = ids.shape
    ids, mask, labels = ids.cpu(), mask.cpu(), labels.cpu()
    keep = mask.view(1, n, s, 1) & (ids >= 0)  # [Lm, N, S, k]
    cell = labels.view(1, n, 1, 1) * num_experts + ids  # [Lm, N, S, k]: row of the flat joint
    out = torch.zeros(lm, num_labels * num_experts, dtype=torch.float64)
    for layer in range(lm):
        chosen = cell[layer][keep[layer]]
        out[layer] = torch.bincount(chosen, minlength=num_labels * num_experts).double()
    return out.view(lm, num_labels, num_experts)


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def mutual_information(joint: torch.Tensor) -> float:
    """I(A; B) in nats of the distribution proportional to the non-negative [A, B] ``joint``
    counts (0 when they are all 0)."""
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint.double() / total
    return _entropy(p.sum(1)) + _entropy(p.sum(0)) - _entropy(p.flatten())


def normalized_mutual_information(joint: torch.Tensor) -> float | None:
    """I(A; B) / H(A) in [0, 1] of the [A, B] ``joint`` counts; None when H(A) = 0 (one row
    holds every count: nothing to explain)."""
    total = joint.sum()
    h = _entropy(joint.double().sum(1) / total) if total > 0 else 0.0
    if h <= 0:
        return None
    return min(1.0, max(0.0, mutual_information(joint) / h))


def normalized_entropy(counts: torch.Tensor) -> float | None:
    """H(p) / log(len(p)) in [0, 1] of the distribution proportional to ``counts`` [E] (E >= 2);
    None when every count is 0."""
    total = counts.sum()
    if total <= 0:
        return None
    return _entropy(counts.double() / total) / math.log(counts.numel())


def routing_metrics(counts: torch.Tensor) -> dict[str, float | None]:
    """``routing/mi_skill_expert/layer<i>`` (None with fewer than two skills counted) and
    ``routing/expert_entropy/layer<i>`` from the [Lm, skills, E] ``counts`` of
    :func:`routing_counts`; ``i`` counts the MoE layers from 0, in model order."""
    out: dict[str, float | None] = {}
    for i, joint in enumerate(counts):
        out[f"routing/mi_skill_expert/layer{i}"] = normalized_mutual_information(joint)
        out[f"routing/expert_entropy/layer{i}"] = normalized_entropy(joint.sum(0))
    return out


def scalar_metrics(result: Mapping[str, object]) -> dict[str, float]:
    """The numbers of an evaluation result: its int and float values (not bools), as floats;
    None, nested dicts and strings are left out."""
    return {k: float(v) for k, v in result.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


class EvalHistory:
    """The evaluations of a run, for the paper's protocol: report the final evaluation and the
    average over every evaluation checkpoint, the final one included.

    Usage::

        history = EvalHistory()
        history.add(step, evaluate(s, pool))       # at every evaluation, the final one too
        ckpt["eval_history"] = history.state_dict()  # and load_state_dict on resume
        write_eval(run_dir, result, history=history)

    Only the numbers of a result are kept (:func:`scalar_metrics`). ``add`` at a step not after
    the last one recorded first drops the records from that step on: they belong to a run that a
    resume from an earlier checkpoint replaces.
    """

    def __init__(self) -> None:
        self._records: list[dict[str, float]] = []  # {"step": s, metric: value, ...}

    def __len__(self) -> int:
        return len(self._records)

    def add(self, step: int, result: Mapping[str, object]) -> None:
        """Record the evaluation ``result`` taken after ``step`` steps."""
        step = int(step)
        self._records = [r for r in self._records if r["step"] < step]
        self._records.append({**scalar_metrics(result), "step": step})

    def summary(self) -> dict:
        """``{"final": {...}, "average": {...}, "steps": [...]}``: the last evaluation's numbers,
        the mean of each metric over the evaluations that have it, and the steps evaluated (in
        order). Empty dicts and list when nothing was recorded."""
        if not self._records:
            return {"final": {}, "average": {}, "steps": []}
        sums: dict[str, list[float]] = {}
        for record in self._records:
            for key, value in record.items():
                if key != "step":
                    sums.setdefault(key, []).append(value)
        final = {k: v for k, v in self._records[-1].items() if k != "step"}
        return {
            "final": final,
            "average": {k: math.fsum(v) / len(v) for k, v in sums.items()},
            "steps": [int(r["step"]) for r in self._records],
        }

    def state_dict(self) -> dict:
        """``{"records": [{"step": s, metric: value, ...}, ...]}`` (plain floats and ints)."""
        return {"records": [dict(r) for r in self._records]}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue the history of ``state`` (from :meth:`state_dict`).

        Raises:
            ValueError: ``state`` has no ``records`` list, or a record has no ``step``.
        """
        records = state.get("records") if isinstance(state, Mapping) else None
        if not isinstance(records, list) or not all(
                isinstance(r, Mapping) and "step" in r for r in records):
            raise ValueError("EvalHistory state: expected {'records': [{'step': ..., ...}, ...]}")
        self._records = [{**{k: float(v) for k, v in r.items() if k != "step"},
                          "step": int(r["step"])} for r in records]
