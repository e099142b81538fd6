"""``vp2o eval`` on benchmark files: the loaders, the pass@k estimator, and an end-to-end run of
the tiny (untrained) MoE on every sample file in ``examples/vp2o/eval/``."""

from __future__ import annotations

import functools
import itertools
import json
import string
from pathlib import Path

import pytest

from vp2o.data.tasks import DatasetError
from vp2o.eval_formats import FORMATS, load_benchmark
from vp2o.evaluate import median_solution_tokens, pass_at_k
from vp2o.rewards import get_reward

SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "vp2o" / "eval"
FILES = {"math": "math.jsonl", "choice": "choice.jsonl", "ifeval": "ifeval.jsonl",
         "code": "code.jsonl"}


# ------------------------------------------------------------------ loaders


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_sample_file_loads_with_its_reward(fmt):
    rows, reward = load_benchmark(SAMPLES / FILES[fmt], fmt)
    assert reward == FORMATS[fmt].reward == fmt
    assert len(rows) >= 4
    for row in rows:
        assert isinstance(row["prompt"], str) and row["prompt"]
        assert row["_source"].startswith(str(SAMPLES / FILES[fmt]))
    auto_rows, auto_reward = load_benchmark(SAMPLES / FILES[fmt])  # auto-detected
    assert auto_reward == reward and [r["prompt"] for r in auto_rows] == [r["prompt"] for r in rows]


def test_math_rows_score_their_answers():
    rows, reward = load_benchmark(SAMPLES / "math.jsonl", "math")
    fn = get_reward(reward)
    for row in rows:
        gold = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
        assert fn(row["prompt"], f"so the result is \\boxed{{{gold}}}", row) == 1.0
        assert "\\boxed{}" in row["prompt"]


def test_choice_forms_agree_and_score():
    rows, reward = load_benchmark(SAMPLES / "choice.jsonl", "choice")
    fn = get_reward(reward)
    assert [r["answer"] for r in rows[:2]] == ["B", "B"]  # a letter, and answer_index 1
    assert rows[3]["answer"] == "B"  # "choices" with a 0-based index
    gpqa = rows[2]  # correct_answer + incorrect_answers, order fixed by the question
    assert gpqa["options"][ord(gpqa["answer"]) - ord("A")] == "Carbon dioxide"
    assert load_benchmark(SAMPLES / "choice.jsonl")[0][2]["options"] == gpqa["options"]
    for row in rows:
        assert f"{row['answer']}. " in row["prompt"]
        assert fn(row["prompt"], f"Answer: {row['answer']}", row) == 1.0
        wrong = "A" if row["answer"] != "A" else "B"
        assert fn(row["prompt"], f"Answer: {wrong}", row) == 0.0


def test_ifeval_and_code_rows_score():
    rows, reward = load_benchmark(SAMPLES / "ifeval.jsonl", "ifeval")
    fn = get_reward(reward)
    assert fn(rows[0]["prompt"], "the sea is calm and blue", rows[0]) == 1.0
    assert fn(rows[0]["prompt"], "the sea, calm, blue", rows[0]) == 0.0
    rows, reward = load_benchmark(SAMPLES / "code.jsonl", "code")
    assert rows[2]["tests"] == [{"input": "5\n", "output": "120\n"},
                                {"input": "0\n", "output": "1\n"}]  # from input_output
    program = "```python\nimport math\nprint(math.factorial(int(input())))\n```"
    assert get_reward(reward)(rows[2]["prompt"], program, rows[2]) == 1.0


@pytest.mark.parametrize(("fmt", "line", "needle"), [
    ("math", {"problem": "1+1?"}, "'answer'"),
    ("choice", {"question": "q", "options": ["a", "b"], "answer": "C"}, "option letters"),
    ("choice", {"question": "q", "options": ["a", "b"], "answer": 5}, "out of range"),
    ("ifeval", {"prompt": "p", "instruction_id_list": ["a"], "kwargs": [{}, {}]}, "same length"),
    ("code", {"question": "q", "tests": []}, "non-empty"),
    # Rows that used to fail with raw Python text, or load and then score 0 (or shuffle the
    # characters of a string into options):
    ("code", {"question": "q", "input_output": {"outputs": ["1"]}},
     "'inputs' and 'outputs' lists of equal length"),
    ("code", {"question": "q", "input_output": {"inputs": ["1", "2"], "outputs": ["1"]}},
     "equal length"),
    ("code", {"question": "q", "input_output": "{not json"}, "a string but not JSON"),
    ("choice", {"question": "q", "correct_answer": "yes", "incorrect_answers": "no"},
     "'incorrect_answers' must be a list, got str"),
    ("ifeval", {"prompt": "p", "instruction_id_list": 3}, "must be a list, got int"),
    ("ifeval", {"prompt": "p", "instruction_id_list": ["no:such"], "kwargs": [{}]},
     r"instruction 0 \('no:such'\): unknown instruction"),
    ("ifeval", {"prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
                "kwargs": [3]}, r"kwargs\[0\] must be an object, got int"),
    # Rows that loaded and then scored 0 on every response, or against a repr:
    ("math", {"problem": "q", "answer": {"x": 2}}, "'answer' must be a non-empty string"),
    ("math", {"problem": "q", "answer": []}, "non-empty list"),
    ("math", {"problem": "q", "answer": ["2", True]}, "non-empty list"),
    ("math", {"problem": "q", "answer": "  "}, "non-empty string"),
    ("choice", {"question": "q", "options": [{"t": 1}, "b"], "answer": "A"},
     "'options' must be a list of 2..26 strings; got"),
    ("code", {"question": "q", "tests": [{"input": "1", "output": None}]},
     r"test 0: 'input' and 'output' must be text"),
    ("code", {"question": "q", "tests": [{"input": "1", "output": "2"}], "time_limit": "fast"},
     "'time_limit' must be a number of CPU seconds > 0"),
    ("code", {"question": "q", "tests": [{"input": "1", "output": "2"}], "time_limit": 0},
     "'time_limit' must be a number"),
])
def test_bad_rows_name_file_and_line(tmp_path, fmt, line, needle):
    path = tmp_path / "b.jsonl"
    path.write_text('{"problem": "ok", "answer": "A", "question": "ok", "options": ["a", "b"], '
                    '"prompt": "p", "instruction_id_list": [], "kwargs": [], '
                    '"tests": [{"input": "", "output": ""}]}\n' + json.dumps(line) + "\n")
    with pytest.raises(DatasetError, match=rf"b\.jsonl:2: {fmt} format: .*{needle}"):
        load_benchmark(path, fmt)


def test_missing_empty_and_unknown_format(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_benchmark(tmp_path / "none.jsonl", "math")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        load_benchmark(tmp_path / "e.jsonl", "math")
    with pytest.raises(DatasetError, match="choose one of"):
        load_benchmark(SAMPLES / "math.jsonl", "gsm")


# ------------------------------------------------------------------ estimator


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_median_solution_tokens():
    assert median_solution_tokens([3, 10, 5, 7], [True, False, True, True]) == 5.0
    assert median_solution_tokens([4, 6], [True, True]) == 5.0
    assert median_solution_tokens([4, 6], [False, False]) is None


# ------------------------------------------------------------------ end to end


def _char_tokenizer(path: Path) -> int:
    from vp2o.data.tokenizer import CharTokenizer

    chars = sorted(set(string.printable).union(*(p.read_text() for p in SAMPLES.glob("*.jsonl"))))
    # pad the alphabet to the model's 128 ids, so every sampled id decodes
    chars += [chr(0x100 + i) for i in range(125 - len(chars))]
    tok = CharTokenizer(chars)
    tok.save(path)
    return tok.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "samples"), [("math", 4), ("choice", 2), ("ifeval", 1),
                                              ("code", 2)])
def test_eval_tiny_model_on_sample_file(tmp_path, fmt, samples):
    from vp2o.config import load_config
    from vp2o.evaluate import run_eval

    vocab = _char_tokenizer(tmp_path / "chars.json")
    assert vocab == 128
    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.num_experts=4",
        "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64", "model.vocab_size=128",
        "model.max_position_embeddings=512", "data.max_prompt_tokens=256",
        "data.num_train_prompts=16", "data.num_eval_prompts=4", "data.tokenizer=char",
        f"data.tokenizer_path={tmp_path / 'chars.json'}", "rollout.max_new_tokens=8",
        f"train.eval_samples={samples}", "reward.workers=0", f"train.run_dir={tmp_path / 'run'}",
    ])
    logged = []
    result = run_eval(cfg, benchmark=str(SAMPLES / FILES[fmt]), fmt=fmt, log=logged.append)
    rows, _ = load_benchmark(SAMPLES / FILES[fmt])
    assert result["reward"] == fmt and result["num_prompts"] == len(rows)
    assert result["samples_per_prompt"] == samples
    assert sorted(result["pass_at_k"], key=int) == [str(k) for k in (1, 2, 4) if k <= samples]
    values = list(result["pass_at_k"].values())
    assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values)  # pass@k grows
    assert 0.0 <= result["mean_reward"] <= 1.0
    assert 1.0 <= result["mean_response_length"] <= 8.0
    assert result["median_solution_tokens"] is None or result["median_solution_tokens"] <= 8
    written = json.loads((tmp_path / "run" / f"eval_{fmt}.json").read_text())
    assert written == json.loads(logged[0]) == json.loads(json.dumps(result))


# ------------------------------------------------------------------ several ranks


@pytest.mark.slow
def test_two_process_eval_with_uneven_chunks_matches_one_process(tmp_path, monkeypatch):
    """5 held-out prompts and 5 benchmark rows in chunks of 2 prompts (1 prompt for 2 samples
    each) over 2 ranks: the ranks hold different numbers of chunks (once, that paired one rank's
    generate with the other's gather: a hang), and eval_samples = 2 adds the sampled pass. Both
    evaluations finish and write what one process writes."""
    import os
    import signal
    import subprocess

    from tiny_train import TINY
    from torchrun import launcher, worker_env

    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": p, "answer": "7"}) + "\n"
                             for p in ("1+2*3=", "4-1+2=", "9*1-2=", "3+3+1=", "8-2+1=")))
    worker = Path(__file__).with_name("eval_worker.py")

    def run(nproc: int, run_dir: Path, *extra: str) -> None:
        args = [*TINY, "data.num_eval_prompts=5", "train.eval_samples=2",
                "reward.name=eval_worker:parity_reward", f"train.run_dir={run_dir}",
                "--log-samples", *extra]
        if nproc == 0:  # the reference: this process, with the worker's chunking
            from vp2o import evaluate
            from vp2o.cli import main as vp2o_main

            with monkeypatch.context() as patch:
                for name in ("evaluate", "evaluate_rows"):
                    patch.setattr(evaluate, name,
                                  functools.partial(getattr(evaluate, name), chunk=2))
                assert vp2o_main(["eval", *args]) == 0
            return
        cmd = [*launcher(nproc), str(worker), "2", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=worker_env(), start_new_session=True)
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:  # a hang: on SIGTERM torchrun ends its workers
            proc.terminate()
            try:
                err = proc.communicate(timeout=60)[1]
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                err = ""
            pytest.fail(f"{nproc} process(es): no result in 180 s (collectives out of step?)\n"
                        + err[-3000:])
        assert proc.returncode == 0, out[-3000:] + err[-5000:]

    results = {}
    for nproc, name in ((0, "one"), (2, "two")):
        run_dir = tmp_path / name
        tokenizer = [f"data.tokenizer_path={tmp_path / 'one' / 'tokenizer.model'}"] if nproc else []
        run(nproc, run_dir, *tokenizer)  # the held-out prompts
        run(nproc, run_dir, *tokenizer, "--benchmark", str(bench), "--format", "math")
        results[name] = {file: json.loads((run_dir / file).read_text())
                         for file in ("eval.json", "eval_bench.json")}
        for file in ("eval", "eval_bench"):  # every response, in row order, on rank 0
            samples = run_dir / f"{file}_samples.jsonl"
            assert results[name][f"{file}.json"].pop("samples_file") == str(samples)
            results[name][file] = [json.loads(line) for line in samples.read_text().splitlines()]
    one, two = results["one"], results["two"]
    # held-out: per row one greedy response, then 2 sampled; the benchmark: 2 sampled per row
    assert [(r["row"], r["kind"], r["sample"]) for r in one["eval"]] == [
        (row, kind, j) for row in range(5) for kind, j in
        (("greedy", 0), ("sampled", 0), ("sampled", 1))]
    assert [(r["row"], r["sample"]) for r in one["eval_bench"]] == [
        (row, j) for row in range(5) for j in range(2)]
    # each held-out reward is the reward of its text (the benchmark's is the math reward)
    assert all(r["reward"] == float(sum(map(ord, r["completion"])) % 2 == 0) for r in one["eval"])
    greedy = [r for r in one["eval"] if r["kind"] == "greedy"]
    assert one["eval.json"]["held_out_accuracy"] == sum(r["reward"] for r in greedy) / 5
    assert one["eval_bench.json"]["mean_reward"] == (
        sum(r["reward"] for r in one["eval_bench"]) / 10)
    assert [r["answer"] for r in one["eval_bench"]] == ["7"] * 10
    assert one["eval.json"]["num_prompts"] == one["eval_bench.json"]["num_prompts"] == 5
    held_out = one["eval.json"]
    assert 0.0 < held_out["held_out_accuracy"] < 1.0  # the reward varies: a real comparison
    assert 0.0 < held_out["pass_at_k"]["1"] < 1.0
    assert two == one
