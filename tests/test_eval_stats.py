"""Evaluation arithmetic (vp2o.eval_stats): pass@k against brute force and its expectation,
routing counts, mutual information and entropy against hand-computed cases, per-skill accuracy,
and the evaluation history (average over checkpoints, resume, eval.json)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from vp2o.eval_stats import (
    EvalHistory,
    mutual_information,
    normalized_entropy,
    normalized_mutual_information,
    pass_at_k,
    routing_counts,
    routing_metrics,
    skill_accuracy,
)


@pytest.mark.parametrize("n", [1, 4, 8])
def test_pass_at_k_is_the_subset_average_and_unbiased(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets),
                                                       abs=1e-12)
    p = 0.3  # over c ~ Binomial(n, p) its mean is the true pass@k, 1 - (1 - p)^k
    for k in range(1, n + 1):
        mean = sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * pass_at_k(n, c, k)
                   for c in range(n + 1))
        assert mean == pytest.approx(1 - (1 - p) ** k, abs=1e-12)


def test_mutual_information_hand_case():
    # p(s, e) = [[1/2, 0], [1/4, 1/4]]: p(s) = (1/2, 1/2), p(e) = (3/4, 1/4);
    # I = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2 = 3/2 ln 2 - 3/4 ln 3, H(S) = ln 2
    joint = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert mutual_information(joint) == pytest.approx(1.5 * math.log(2) - 0.75 * math.log(3))
    assert normalized_mutual_information(joint) == pytest.approx(1.5 - 0.75 * math.log2(3))
    assert normalized_mutual_information(torch.tensor([[3.0, 0, 0], [0, 2, 5]])) == \
        pytest.approx(1.0)  # the expert identifies the skill
    assert normalized_mutual_information(torch.tensor([[1.0, 3], [2, 6]])) == \
        pytest.approx(0.0, abs=1e-12)  # independent
    assert normalized_mutual_information(torch.tensor([[1.0, 3]])) is None  # one skill


def test_normalized_entropy_hand_case():
    assert normalized_entropy(torch.tensor([5.0, 5, 5, 5])) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([0.0, 7, 0, 0])) == pytest.approx(0.0)
    # p = (1/2, 1/4, 1/4, 0): H = 1.5 ln 2, log E = 2 ln 2
    assert normalized_entropy(torch.tensor([2.0, 1, 1, 0])) == pytest.approx(0.75)
    assert normalized_entropy(torch.zeros(4)) is None


def test_routing_counts_and_metrics_hand_case():
    # 1 MoE layer, 2 rows (skills 1 and 0), 3 columns, top-2; only the masked tokens count.
    ids = torch.tensor([[[[0, 1], [0, 2], [-1, -1]],
                         [[2, 3], [1, 3], [0, 1]]]])
    mask = torch.tensor([[False, True, True], [True, True, False]])
    counts = routing_counts(ids, mask, torch.tensor([1, 0]), num_labels=2, num_experts=4)
    assert counts.tolist() == [[[0, 1, 1, 2], [1, 0, 1, 0]]]  # row 0's pad column is -1
    metrics = routing_metrics(counts)
    assert metrics["routing/mi_skill_expert/layer0"] == pytest.approx(
        normalized_mutual_information(counts[0]))
    p = torch.tensor([1, 1, 2, 2]) / 6  # the experts' shares of the 6 assignments
    assert metrics["routing/expert_entropy/layer0"] == pytest.approx(
        float(-(p * p.log()).sum()) / math.log(4))


def test_skill_accuracy():
    out = skill_accuracy(["add", "rev", "add", None, "add"], [True, False, False, True, True])
    assert out == {"skill/add/accuracy": pytest.approx(2 / 3), "skill/rev/accuracy": 0.0}


def test_eval_history_averages_every_checkpoint_and_resumes(tmp_path):
    history = EvalHistory()
    assert history.summary() == {"final": {}, "average": {}, "steps": []}
    history.add(80, {"held_out_accuracy": 0.2, "pass@4": 0.5, "pass_at_k": {"1": 0.2},
                     "median_solution_tokens": None, "num_prompts": 10})
    history.add(160, {"held_out_accuracy": 0.4, "pass@4": 0.7, "num_prompts": 10,
                      "skill/add/accuracy": 1.0})
    saved = json.loads(json.dumps(history.state_dict()))  # plain data, as a checkpoint holds it
    history.add(240, {"held_out_accuracy": 0.9, "pass@4": 0.9, "num_prompts": 10})

    resumed = EvalHistory()
    resumed.load_state_dict(saved)
    resumed.add(240, {"held_out_accuracy": 0.6, "pass@4": 0.9, "num_prompts": 10})
    resumed.add(240, {"held_out_accuracy": 0.6, "pass@4": 0.9, "num_prompts": 10})  # again
    summary = resumed.summary()
    assert summary["steps"] == [80, 160, 240]
    assert summary["final"] == {"held_out_accuracy": 0.6, "pass@4": 0.9, "num_prompts": 10.0}
    assert summary["average"] == pytest.approx({
        "held_out_accuracy": 0.4, "pass@4": 0.7, "num_prompts": 10.0,
        "skill/add/accuracy": 1.0,  # over the one evaluation that has it
    })
    with pytest.raises(ValueError, match="records"):
        EvalHistory().load_state_dict({"steps": []})

    from vp2o.evaluate import write_eval

    final = {"held_out_accuracy": 0.6, "pass_at_k": {"1": 0.6}, "num_prompts": 10}
    written = json.loads(write_eval(tmp_path, final, history=resumed).read_text())
    assert {k: written[k] for k in final} == final  # the keys eval.json always had
    assert written["history"] == json.loads(json.dumps(summary))
    assert "history" not in json.loads(write_eval(tmp_path, final).read_text())
