"""Benchmark files for ``vp2o eval``: JSONL formats, each mapped to rows and a reward name.

    rows, reward = load_benchmark("examples/vp2o/eval/math.jsonl", "math")

One JSON object per line. A row that has a ``prompt`` field is sent to the model verbatim; else
the prompt is built from the format's fields with the format's template (below). Every row keeps
its original fields (the reward reads them) and gets ``prompt``, ``answer`` and ``_source``
("file:line", used in error messages).

- ``math`` (reward ``math``): ``problem`` (or ``question``), ``answer`` (string, number or list).
- ``choice`` (reward ``choice``): ``question``, ``options`` (or ``choices``), ``answer`` (a letter
  or a 0-based index; or ``answer_index``); or GPQA's ``correct_answer`` + ``incorrect_answers``.
- ``ifeval`` (reward ``ifeval``): ``prompt``, ``instruction_id_list``, ``kwargs``.
- ``code`` (reward ``code``): ``question`` (or ``problem``), ``tests`` [{``input``, ``output``}]
  or ``input_output`` ({``inputs``, ``outputs``}, also as a JSON string), optional ``time_limit``.

``auto`` picks the format from the first row's fields (``instruction_id_list`` -> ifeval,
``tests``/``input_output`` -> code, ``options``/``choices``/``correct_answer`` -> choice, else
math). The formats live in ``FORMATS`` (a registry: a duplicate name raises).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vp2o.data.tasks import DatasetError, is_number, is_text_or_number, iter_jsonl_objects
from vp2o.registry import Registry

__all__ = ["FORMATS", "BenchmarkFormat", "detect_format", "load_benchmark", "register_format"]

MATH_TEMPLATE = "{problem}\n\nPut the final answer within \\boxed{{}}."
CHOICE_TEMPLATE = "{question}\n\n{options}\n\nAnswer with the letter of the correct option."
CODE_TEMPLATE = (
    "{question}\n\nWrite a Python 3 program that reads standard input and writes standard "
    "output. Put the program in one ```python code block."
)
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class BenchmarkFormat:
    """One file format: how a raw row becomes an evaluation row, and which reward scores it.

    Attributes:
        name: the format's name (``--format``).
        reward: the registered reward name (``vp2o.rewards``).
        convert: raw row -> row with ``prompt`` and ``answer``; raises ``ValueError`` with the
            problem (the loader adds file and line).
    """

    name: str
    reward: str
    convert: Callable[[dict], dict]


FORMATS: Registry[BenchmarkFormat] = Registry("benchmark format", error=DatasetError)


def register_format(name: str, reward: str) -> Callable:
    """Decorator registering ``convert`` as format ``name`` scored by ``reward``."""

    def wrap(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        FORMATS.add(name, BenchmarkFormat(name, reward, fn))
        return fn

    return wrap


def _field(row: dict, *names: str) -> object:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise ValueError(f"missing field {' / '.join(repr(n) for n in names)}")


@register_format("math", "math")
def _math(row: dict) -> dict:
    answer = _field(row, "answer")
    golds = answer if isinstance(answer, list) else [answer]
    if not golds or not all(is_text_or_number(g, empty=False) for g in golds):
        # anything else would score 0 on every response, or compare against its repr
        raise ValueError(f"'answer' must be a non-empty string or a number, or a non-empty list of "
                         f"them (accepted answers); got {json.dumps(answer)[:80]}")
    prompt = row.get("prompt") or MATH_TEMPLATE.format(problem=_field(row, "problem", "question"))
    return {**row, "prompt": str(prompt), "answer": answer}


@register_format("choice", "choice")
def _choice(row: dict) -> dict:
    row = dict(row)
    if "correct_answer" in row and "options" not in row and "choices" not in row:
        # GPQA: one correct and the incorrect answers, in an order fixed by the question's hash
        incorrect = _field(row, "incorrect_answers")
        if not isinstance(incorrect, list):  # a string would be split into its characters
            raise ValueError(f"'incorrect_answers' must be a list, got {type(incorrect).__name__}")
        options = [row["correct_answer"], *incorrect]
        seed = int(hashlib.sha256(str(row.get("question", "")).encode()).hexdigest()[:8], 16)
        order = list(range(len(options)))
        random.Random(seed).shuffle(order)
        row["options"] = [options[i] for i in order]
        row["answer"] = LETTERS[order.index(0)]
    options = _field(row, "options", "choices")
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"'options' must be a list of 2..{len(LETTERS)} strings")
    if not all(is_text_or_number(o, empty=False) for o in options):
        raise ValueError(f"'options' must be a list of 2..{len(LETTERS)} strings; got "
                         f"{json.dumps(options)[:80]}")
    row["options"] = [str(o) for o in options]
    answer = _field(row, "answer", "answer_index")
    if is_number(answer) and isinstance(answer, int):
        if not 0 <= answer < len(options):
            raise ValueError(f"answer index {answer} is out of range for {len(options)} options")
        answer = LETTERS[answer]
    answer = str(answer).strip().strip("()").upper()
    if answer not in LETTERS[: len(options)]:
        raise ValueError(f"answer {answer!r} is not one of the option letters "
                         f"A..{LETTERS[len(options) - 1]}")
    listing = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"]))
    prompt = row.get("prompt") or CHOICE_TEMPLATE.format(
        question=_field(row, "question"), options=listing
    )
    return {**row, "prompt": str(prompt), "answer": answer}


@register_format("ifeval", "ifeval")
def _ifeval(row: dict) -> dict:
    ids = _field(row, "instruction_id_list")
    if not isinstance(ids, list):
        raise ValueError(f"'instruction_id_list' must be a list, got {type(ids).__name__}")
    kwargs = row.get("kwargs") or [{} for _ in ids]
    if not isinstance(kwargs, list) or len(ids) != len(kwargs):
        raise ValueError("'instruction_id_list' and 'kwargs' must be lists of the same length")
    from vp2o.rewards.ifeval import build_instruction

    for i, (name, args) in enumerate(zip(ids, kwargs, strict=True)):
        if args is not None and not isinstance(args, dict):
            raise ValueError(f"kwargs[{i}] must be an object, got {type(args).__name__}")
        try:  # an unknown id or bad kwargs would otherwise score 0 on every response
            build_instruction(name, args)
        except (ValueError, TypeError) as e:
            raise ValueError(f"instruction {i} ({name!r}): {e}") from None
    return {**row, "prompt": str(_field(row, "prompt")), "answer": None, "kwargs": kwargs}


@register_format("code", "code")
def _code(row: dict) -> dict:
    tests = row.get("tests")
    if tests is None:
        io = _field(row, "input_output")
        if isinstance(io, str):
            try:
                io = json.loads(io)
            except json.JSONDecodeError as e:
                raise ValueError(f"'input_output' is a string but not JSON ({e.msg})") from None
        inputs = io.get("inputs") if isinstance(io, dict) else None
        outputs = io.get("outputs") if isinstance(io, dict) else None
        if not isinstance(inputs, list) or not isinstance(outputs, list) \
                or len(inputs) != len(outputs):
            raise ValueError("'input_output' needs 'inputs' and 'outputs' lists of equal length")
        tests = [{"input": i, "output": o} for i, o in zip(inputs, outputs, strict=True)]
    if not isinstance(tests, list) or not tests:
        raise ValueError("'tests' must be a non-empty list of {input, output}")
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise ValueError("every test needs 'input' and 'output'")
        if not ((t["input"] is None or is_text_or_number(t["input"]))
                and is_text_or_number(t["output"])):
            raise ValueError(f"test {i}: 'input' and 'output' must be text (or numbers; input may "
                             f"be null); got {json.dumps(t)[:80]}")
    limit = row.get("time_limit")
    if limit is not None and not (is_number(limit) and limit > 0):
        raise ValueError(f"'time_limit' must be a number of CPU seconds > 0 (or absent); got "
                         f"{json.dumps(limit)}")
    prompt = row.get("prompt") or CODE_TEMPLATE.format(question=_field(row, "question", "problem"))
    return {**row, "prompt": str(prompt), "answer": None, "tests": tests}


def detect_format(row: dict) -> str:
    """The format a raw row looks like (see the module docstring)."""
    if "instruction_id_list" in row:
        return "ifeval"
    if "tests" in row or "input_output" in row:
        return "code"
    if any(k in row for k in ("options", "choices", "correct_answer")):
        return "choice"
    return "math"


def load_benchmark(path: str | Path, fmt: str = "auto", *,
                   limit: int | None = None) -> tuple[list[dict], str]:
    """Rows of a benchmark file and the name of the reward that scores them.

    Args:
        path: a JSONL file.
        fmt: a key of ``FORMATS``, or ``auto``.
        limit: keep only the first ``limit`` rows.

    Raises:
        DatasetError: a missing or empty file, bad JSON, or a row the format cannot read
            (naming file and line); an unknown format (naming the choices).
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetError(f"unknown benchmark format {fmt!r}; choose one of: "
                           f"auto, {', '.join(FORMATS.names())}")
    rows, chosen = [], None if fmt == "auto" else FORMATS[fmt]
    for lineno, raw in iter_jsonl_objects(path, what="benchmark"):
        if chosen is None:
            chosen = FORMATS[detect_format(raw)]
        try:
            row = chosen.convert(raw)
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{path}:{lineno}: {chosen.name} format: {e}") from None
        row["_source"] = f"{path}:{lineno}"
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DatasetError(f"{path}: benchmark file is empty")
    return rows, chosen.reward
