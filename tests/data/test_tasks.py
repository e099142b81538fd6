"""Dataset rows are checked when they are loaded, naming the file and line: a bad row must not
surface as a bare exception (or a silently changed row) in whichever step first draws it."""

from __future__ import annotations

import json

import pytest

from vp2o.config import ConfigError, load_config
from vp2o.data.tasks import DatasetError, encode_rows, read_jsonl
from vp2o.data.tokenizer import CharTokenizer

GOOD = '{"prompt": "1+2=", "answer": "3"}\n'


def _read(tmp_path, text: str | bytes):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path, lambda: read_jsonl(path, prompt_field="prompt", answer_field="answer")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.encode() + b'{"prompt": "caf\xe9", "answer": "1"}\n',
         ":2: not valid UTF-8 text (byte 15: invalid continuation byte)"),
        (GOOD + json.dumps({"prompt": None, "answer": "1"}) + "\n",
         ":2: field 'prompt' must be a string, got NoneType"),
        (GOOD + json.dumps({"prompt": ["a", "b"], "answer": "1"}) + "\n",
         ":2: field 'prompt' must be a string, got list"),
        (GOOD + GOOD + json.dumps({"prompt": "2+2=", "answer": None}) + "\n",
         ":3: field 'answer' is null"),
    ],
    ids=["not-utf8", "null-prompt", "list-prompt", "null-answer"],
)
def test_rows_that_used_to_pass_or_fail_without_a_line(tmp_path, text, message):
    path, read = _read(tmp_path, text)
    with pytest.raises(DatasetError) as err:
        read()
    assert str(err.value) == f"{path}{message}"


def test_a_byte_order_mark_is_tolerated_and_rows_keep_their_source(tmp_path):
    path, read = _read(tmp_path, "\ufeff" + GOOD + "\n" + GOOD.replace("3", "4"))
    rows = read()
    assert [(r["prompt"], r["answer"], r["_source"]) for r in rows] == [
        ("1+2=", "3", f"{path}:1"), ("1+2=", "4", f"{path}:3")]


def test_encoding_names_the_row_that_cannot_be_encoded(tmp_path):
    path, read = _read(tmp_path, GOOD + '{"prompt": "1x2=", "answer": "3"}\n'
                       + '{"prompt": "", "answer": "3"}\n')
    rows = read()
    tok = CharTokenizer("0123456789+-=")
    assert encode_rows(rows[:1], tok.encode) == [tok.encode("1+2=")]
    with pytest.raises(DatasetError) as err:
        encode_rows(rows, tok.encode)
    assert str(err.value) == (f"{path}:2: prompt: character 'x' at position 1 is not in the "
                              "alphabet '0123456789+-='")
    with pytest.raises(DatasetError, match=rf"^{path}:3: prompt is empty \(it encodes to no token"):
        encode_rows(rows[2:], tok.encode)
    with pytest.raises(DatasetError, match=rf"^{path}:1: answer: character '3'"):
        encode_rows(rows, CharTokenizer("12+=").encode, text=lambda r: r["answer"], what="answer")


def test_a_config_file_that_is_not_utf8_names_its_line_and_column(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"model:\n  num_layers: 2\n  # caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:3:8: not valid UTF-8 text (invalid continuation byte)"
