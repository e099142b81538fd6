"""``vp2o eval`` of the tiny (untrained) MoE on the multi-skill task: the tokenizer trained for
the task, the greedy and temperature-1 passes, and every metric of the evaluation protocol."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_eval_on_the_skills_task_reports_every_metric(tmp_path):
    from tiny_train import TINY

    from vp2o.config import load_config
    from vp2o.data.skills import SKILLS
    from vp2o.evaluate import run_eval

    cfg = load_config(None, [*TINY, "data.task=skills", "data.num_eval_prompts=6",
                             "rollout.max_new_tokens=8", "train.eval_samples=8",
                             # a reward with signal on the untrained model (exact scores 0
                             # everywhere, and every rebuilt metric would compare 0 with 0)
                             "reward.name=eval_worker:parity_reward",
                             f"train.run_dir={tmp_path}"], loop="eval")
    result = run_eval(cfg, log_samples=True, log=lambda _: None)
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(result))
    _check_samples(result, tmp_path / "eval_samples.jsonl")
    assert result["num_prompts"] == 6  # one per skill
    probabilities = [result["held_out_accuracy"], result["pass@1"], result["pass@4"],
                     result["pass@8"], *(result[f"skill/{n}/accuracy"] for n in SKILLS)]
    assert all(0.0 <= v <= 1.0 for v in probabilities)
    assert result["pass@1"] <= result["pass@4"] <= result["pass@8"]
    assert result["pass@4"] == result["pass_at_k"]["4"]
    assert 1.0 <= result["response_len"] <= 8.0
    for layer in range(2):  # TINY: 2 MoE layers of 4 experts, top-2
        for key in ("mi_skill_expert", "expert_entropy"):
            value = result[f"routing/{key}/layer{layer}"]
            assert isinstance(value, float) and 0.0 <= value <= 1.0 and math.isfinite(value)
    assert not any(k.startswith("routing/") and k.endswith("layer2") for k in result)


def _check_samples(result: dict, path) -> None:
    """The samples log against the metrics: every response (one greedy, 8 sampled per prompt),
    its reward recomputed from its text, and the accuracy, pass@k and lengths rebuilt from it."""
    from eval_worker import parity_reward

    assert result["samples_file"] == str(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["row"], r["kind"], r["sample"]) for r in records] == [
        (row, kind, j) for row in range(6)
        for kind, j in [("greedy", 0)] + [("sampled", j) for j in range(8)]]
    for r in records:
        assert r["reward"] == parity_reward(r["prompt"], r["completion"], {"answer": r["answer"]})
        assert 1 <= r["response_tokens"] <= 8
    sampled = [r["reward"] for r in records if r["kind"] == "sampled"]
    assert 0 < sum(sampled) < len(sampled)  # the rewards vary: the checks below can fail
    greedy = [r for r in records if r["kind"] == "greedy"]
    assert result["held_out_accuracy"] == sum(r["reward"] for r in greedy) / 6
    assert result["mean_response_length"] == sum(r["response_tokens"] for r in greedy) / 6
    for r in greedy:
        assert result[f"skill/{r['skill']}/accuracy"] == r["reward"]  # one prompt per skill
    correct = [sum(r["reward"] >= 1 for r in records if r["row"] == row and r["kind"] == "sampled")
               for row in range(6)]
    # the unbiased estimator 1 - C(n-c, k) / C(n, k), written out
    want = sum(1 - math.comb(8 - c, 4) / math.comb(8, 4) for c in correct) / 6
    assert math.isclose(result["pass@4"], want)
