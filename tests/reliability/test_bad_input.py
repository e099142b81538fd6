"""Bad input: config files and overrides, JSONL datasets, tokenizer files and checkpoints of
another model shape. Each message names the file, line or key and what was expected; the CLI
reports the ones it catches on stderr with exit status 2 (no traceback).

tests/test_config.py covers the loader's rejections one by one (unknown keys, wrong types,
layouts, malformed YAML through load_config); here they go through `vp2o train`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rel_helpers import REPO, TINY, env

from vp2o.cli import main as cli_main
from vp2o.data.tokenizer import CharTokenizer
from vp2o.mcore.checkpoint import CheckpointError


def _one_line(capsys) -> str:
    """What the CLI wrote to stderr, checked to be one line and no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vp2o.cli", "train", *args],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)


@pytest.mark.parametrize(
    "yaml_text, overrides, words",
    [
        ("model:\n  num_layers: 2\n hidden_size: 3\n", [], ["{path}:3:2: malformed YAML"]),
        ("model:\n  num_layer: 2\n", [], ["model.num_layer: unknown key", "num_layers"]),
        ("model:\n  num_layers: two\n", [], ["model.num_layers = 'two'", "an integer"]),
        ("- a\n- b\n", [], ["{path}: expected a mapping of sections"]),
        ("seed: 1\n", ["rollout.group_size=1"], ["rollout.group_size = 1", ">= 2"]),
        ("seed: 1\n", ["optimizer.lr=fast"], ["optimizer.lr = 'fast'", "a number"]),
        ("seed: 1\n", ["train.steps"], ["override 'train.steps'", "key.sub=value"]),
        ("seed: 1\n", ["model.num_experts.x=1"], ["model.num_experts = {'x': 1}", "an integer"]),
    ],
    ids=["yaml-syntax", "unknown-key", "wrong-type", "top-level-list", "invalid-value",
         "bad-number", "no-equals", "not-a-section"],
)
def test_config_errors_through_the_cli(tmp_path, capsys, yaml_text, overrides, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert cli_main(["train", "--config", str(path), *overrides]) == 2
    err = _one_line(capsys)
    assert err.startswith("vp2o: config error: "), err
    assert all(w.replace("{path}", str(path)) in err for w in words), err


@pytest.mark.slow
def test_config_error_in_a_real_process(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  group_size: 8\n  temprature: 0.7\n")
    proc = cli("--config", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"vp2o: config error: {path}:3: rollout.temprature: unknown key; did you mean "
        "rollout.temperature? expected one of: "
        "enforce_eager, engine, gpu_memory_utilization, group_size, kv_cache_gib, lean_decode, "
        "max_model_len, max_new_tokens, max_num_seqs, micro_batch_size, prompts_per_step, "
        "router_replay, sleep_between_rollouts, stop_strings, temperature, tensor_parallel, "
        "top_k, top_p"
    )


# ------------------------------------------------------------------------------- datasets


@pytest.fixture
def data(tmp_path):
    """Writes JSONL files; ``tokenizer`` is a char tokenizer over the test text."""

    class Data:
        tokenizer = tmp_path / "char.json"

        def write(self, name: str, text: str):
            path = tmp_path / name
            path.write_text(text)
            return path

    CharTokenizer.from_corpus(["abcdefghijklmnopqrstuvwxyz0123456789+-= "]).save(Data.tokenizer)
    return Data()


def _jsonl_args(tmp_path, train_path, tokenizer, *extra):
    # The same file as held-out rows: the training file is read (and fails) first.
    return [*TINY, "data.task=jsonl", f"data.train_path={train_path}",
            f"data.eval_path={train_path}", "data.tokenizer=char",
            f"data.tokenizer_path={tokenizer}", f"train.run_dir={tmp_path / 'run'}",
            "train.steps=1", *extra]


GOOD = '{"prompt": "1+2=", "answer": "3"}\n'


@pytest.mark.slow
@pytest.mark.parametrize(
    "text, extra, words",
    [
        (GOOD + '{"prompt": "2+2=", "answer": "4"\n', [], [":2: not valid JSON"]),
        (GOOD + GOOD + '{"prompt": "2+2="}\n', [], [":3: missing field 'answer'"]),
        (GOOD + '{"question": "2+2=", "answer": "4"}\n', [], [":2: missing field 'prompt'"]),
        (GOOD + '["2+2=", "4"]\n', [], [":2: expected a JSON object"]),
        ("\n\n", [], ["dataset file is empty"]),
        (GOOD + json.dumps({"prompt": "1+" * 20 + "1=", "answer": "21"}) + "\n",
         ["data.max_prompt_tokens=16"], [":2: prompt has 42 tokens", "data.max_prompt_tokens=16"]),
    ],
    ids=["broken-json", "missing-answer", "missing-prompt", "not-an-object", "empty",
         "over-long-prompt"],
)
def test_dataset_errors(tmp_path, data, capsys, destroy_parallel, text, extra, words):
    path = data.write("train.jsonl", text)
    assert cli_main(["train", *_jsonl_args(tmp_path, path, data.tokenizer, *extra)]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"vp2o: data error: {path}"), err
    assert all(w in err for w in words), err


@pytest.mark.slow
def test_sft_refuses_an_answer_with_no_one_text(tmp_path, data, capsys, destroy_parallel):
    """A list of accepted answers is for the reward; SFT has no one text to train on."""
    path = data.write("train.jsonl", GOOD + '{"prompt": "2+2=", "answer": ["4", "04"]}\n')
    args = _jsonl_args(tmp_path, path, data.tokenizer, "sft.steps=1", "sft.batch_size=2")
    assert cli_main(["sft", *args]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"vp2o: data error: {path}:2: answer: vp2o sft trains on the answer's "
                          "text: expected a string or a number, got list"), err


@pytest.mark.slow
def test_missing_dataset_file(tmp_path, data, capsys, destroy_parallel):
    assert cli_main(["train", *_jsonl_args(tmp_path, tmp_path / "nope.jsonl", data.tokenizer)]) == 2
    err = _one_line(capsys)
    assert err == f"vp2o: data error: {tmp_path / 'nope.jsonl'}: dataset file does not exist\n"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "sentencepiece"])
def test_missing_tokenizer_file(tmp_path, data, capsys, destroy_parallel, kind):
    path = data.write("train.jsonl", GOOD)
    missing = tmp_path / f"missing.{kind}"
    args = _jsonl_args(tmp_path, path, missing, f"data.tokenizer={kind}")
    assert cli_main(["train", *args]) == 2
    err = _one_line(capsys)
    assert err.startswith("vp2o: data error: "), err
    assert str(missing) in err and "file not found" in err and "data.tokenizer_path" in err, err


@pytest.mark.slow
def test_corrupt_tokenizer_file(tmp_path, data, capsys, destroy_parallel):
    path = data.write("train.jsonl", GOOD)
    bogus = data.write("bogus.model", "not a model")
    args = _jsonl_args(tmp_path, path, bogus, "data.tokenizer=sentencepiece")
    assert cli_main(["train", *args]) == 2
    err = _one_line(capsys)
    assert f"not a sentencepiece model: {str(bogus)!r}" in err, err


# ------------------------------------------------------------------------ checkpoint shape


@pytest.fixture(scope="module")
def four_expert_checkpoint(tmp_path_factory):
    from vp2o.config import load_config
    from vp2o.train import train

    run = tmp_path_factory.mktemp("shape") / "run"
    train(load_config(None, [*TINY, f"train.run_dir={run}", "train.steps=1"]))
    return run / "checkpoints"


@pytest.mark.slow
def test_checkpoint_of_another_model_shape_is_named(tmp_path, four_expert_checkpoint):
    from vp2o.config import load_config
    from vp2o.train import train

    cfg = load_config(None, [*TINY, "model.num_experts=8", f"train.run_dir={tmp_path / 'run'}",
                             f"train.init_checkpoint={four_expert_checkpoint}", "train.steps=1"])
    with pytest.raises(CheckpointError) as e:
        train(cfg)
    msg = str(e.value)
    assert str(four_expert_checkpoint / "step_00000001") in msg and "does not fit" in msg, msg
    assert "decoder.layers.mlp.router.weight" in msg and "(2, 4, 64)" in msg, msg
    assert "(2, 8, 64)" in msg and "another model shape" in msg, msg


@pytest.mark.slow
def test_checkpoint_of_another_model_shape_through_the_cli(tmp_path, four_expert_checkpoint,
                                                          capsys):
    args = [*TINY, "model.num_experts=8", f"train.run_dir={tmp_path / 'run'}",
            f"train.init_checkpoint={four_expert_checkpoint}", "train.steps=1"]
    assert cli_main(["train", *args]) == 2
    err = _one_line(capsys)
    assert err.startswith("vp2o: checkpoint error: ") and "does not fit this model" in err
