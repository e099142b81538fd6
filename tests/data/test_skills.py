"""The built-in multi-skill task: determinism, held-out rows disjoint from training, every skill's
answer computed independently here and scored by the ``exact`` reward, response lengths under
the tokenizer a run trains for it, and the config's checks."""

from __future__ import annotations

import re
from collections import Counter
from types import SimpleNamespace

import pytest

from vp2o.data.skills import ALPHABET, SKILLS, SKILLS_PROMPTS, skills_corpus, skills_rows
from vp2o.data.tasks import BUILTIN_TASKS, DatasetError, load_task
from vp2o.rewards import get_reward


def _spec(train: int, evaluation: int) -> SimpleNamespace:
    return SimpleNamespace(task="skills", train_path=None, eval_path=None, prompt_field="prompt",
                           answer_field="answer", num_train_prompts=train,
                           num_eval_prompts=evaluation)


def _reference_answer(prompt: str) -> str:
    """Each skill's answer, worked out from the prompt's text alone."""
    name, operand = re.fullmatch(r"([a-z]+):(.*)=", prompt).groups()
    if name == "add":
        a, b = (int(x[::-1]) for x in operand.split("+"))  # least significant digit first
        return str(a + b)[::-1]
    if name == "rev":
        return "".join(reversed(operand))
    if name == "sort":
        return "".join(sorted(operand))
    if name == "count":
        counts = Counter(operand)
        return "".join(f"{c}{counts[c]}" for c in "abcd")
    if name == "bin":
        return bin(int(operand, 8))[2:].zfill(3 * len(operand))
    if name == "mod":
        assert set(operand) <= set("01234")
        return "".join(str(sum(map(int, operand[: i + 1])) % 5) for i in range(len(operand)))
    raise AssertionError(name)


def test_rows_are_deterministic_balanced_and_correct():
    rows = skills_rows(600, seed=3)
    assert rows == skills_rows(600, seed=3)
    assert rows != skills_rows(600, seed=4)
    assert Counter(r["skill"] for r in rows) == {name: 100 for name in SKILLS}
    assert len(SKILLS) >= 5
    for row in rows:
        assert row["prompt"].startswith(row["skill"] + ":")
        assert row["answer"] == _reference_answer(row["prompt"]), row
        assert set(row["prompt"] + row["answer"]) <= set(ALPHABET)
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_held_out_rows_are_disjoint_from_training():
    split = load_task(_spec(3000, 300), seed=7)
    assert len(split.train) == 3000 and len(split.eval) == 300
    assert not {r["prompt"] for r in split.train} & {r["prompt"] for r in split.eval}
    assert {r["skill"] for r in split.eval} == set(SKILLS)
    assert load_task(_spec(3000, 300), seed=7) == split


def test_too_many_prompts_is_refused_naming_the_keys():
    with pytest.raises(DatasetError, match=r"data\.num_train_prompts \+ data\.num_eval_prompts = "
                                           rf"{SKILLS_PROMPTS + 1}: expected at most "
                                           rf"{SKILLS_PROMPTS}, .*data\.task='skills'"):
        load_task(_spec(SKILLS_PROMPTS, 1), seed=0)


def test_config_accepts_the_task_and_checks_its_prompt_count():
    from vp2o.config import ConfigError, load_config

    cfg = load_config(None, ["data.task=skills"])
    assert cfg.data.task == "skills" and "skills" in BUILTIN_TASKS
    with pytest.raises(ConfigError, match=rf"data\.num_train_prompts = {SKILLS_PROMPTS}: "
                                          rf"expected at most {SKILLS_PROMPTS} - "
                                          r"data\.num_eval_prompts: data\.task=skills"):
        load_config(None, ["data.task=skills", f"data.num_train_prompts={SKILLS_PROMPTS}"])


@pytest.mark.parametrize("skill", list(SKILLS))
def test_exact_reward_scores_each_skill(skill):
    reward = get_reward("exact")
    rows = [r for r in skills_rows(60, seed=1) if r["skill"] == skill]
    for row in rows:
        answer = row["answer"]
        assert reward(row["prompt"], answer, row) == 1.0
        assert reward(row["prompt"], f"  {answer.upper()}\n", row) == 1.0  # case, whitespace
        assert reward(row["prompt"], answer[:-1], row) == 0.0  # one character short
        wrong = answer[:-1] + ("0" if answer[-1] != "0" else "1")
        assert reward(row["prompt"], wrong, row) == 0.0
        assert reward(row["prompt"], answer[::-1] if answer != answer[::-1] else "x", row) == 0.0


def test_responses_have_8_to_40_tokens_under_the_runs_tokenizer(tmp_path):
    """The tokenizer ``vp2o sft``/``train`` train for a built-in task (vp2o.session): a
    sentencepiece character model of the task's corpus; a response is its answer and EOS."""
    from vp2o.data.tokenizer import SentencePieceTokenizer

    split = load_task(_spec(600, 120), seed=0)
    tok = SentencePieceTokenizer.train(skills_corpus(split.train + split.eval),
                                       model_prefix=tmp_path / "tok", vocab_size=64,
                                       model_type="char", add_dummy_prefix=False)
    assert tok.vocab_size == len(ALPHABET) + 4  # every character, and 4 specials
    lengths = Counter()
    for row in split.train + split.eval:
        ids = tok.encode(row["answer"], add_eos=True)
        assert 8 <= len(ids) <= 40 and tok.decode(ids) == row["answer"]
        assert tok.unk_id not in tok.encode(row["prompt"] + row["answer"])
        lengths[len(ids)] += 1
    assert min(lengths) == 9 and max(lengths) == 13  # within rollout.max_new_tokens = 16
