"""Child process behind the `math` reward: math-verify equivalence checks, one per input line.

Run as a script (`python _math_worker.py`), never imported by the trainer. Protocol: it prints
"ready" once math-verify is imported, then for every JSON line `{"gold": str, "pred": str,
"inner_timeout": int}` on stdin it prints "1" (equivalent) or "0". The parent kills and restarts
this process when a check overruns its deadline, which also covers hangs inside C code (huge
integer powers) that math-verify's own signal-based timeout cannot interrupt. EOF on stdin ends it.
"""

from __future__ import annotations

import json
import logging
import re
import sys


def _wrap(expr: str) -> str:
    return "$" + expr.replace("$", " ") + "$"


_EQUALS = re.compile(r"(?<![<>!\\])=")  # an equation's "=" (not <=, >=, !=)
_JOINED = re.compile(
    r"\\(?:land|lor|wedge|vee|quad|qquad)\b|\\\\"
    r"|\\(?:text|textrm|mathrm|textbf)\{\s*(?:and|or)\s*\}|(?<![\\\w])(?:and|or)\b"
)


def _equations_as_list(expr: str) -> str:
    """Equations joined by a word or a spacer as one comma-separated list: `x=1 \\lor x=2` is
    `x=1 , x=2`, which math-verify compares as the set of its equations.

    math-verify reads `x=1 \\lor x=2` as its last equation, so a gold `x=2` would accept that
    hedge and a gold `x=1 \\lor x=2` would accept `x=2` alone; as lists, each side must state the
    other's equations, no more and no fewer, in any order."""
    if len(_EQUALS.findall(expr)) < 2:
        return expr
    return _JOINED.sub(" , ", expr)


def _one_value(gold: str, pred: str, pred_parsed: list) -> bool:
    """Whether `pred` states one value, as a gold answer that is not an equation needs.

    math-verify reduces an answer equation to its last right-hand side when the gold is not one,
    so `5 = 7`, `x=1 \\lor x=2` or `1=2=...=10` would score against the last value. Here an
    answer equation counts only as a single `symbol = value` (`x = 5`): a chain, several
    equations joined (`\\land`, `\\lor`, `\\\\`, `\\quad`, "and"/"or") or an equation between two
    expressions is not one value."""
    if _EQUALS.search(gold) or not _EQUALS.search(pred):  # inequalities: math-verify decides
        return True
    if len(_EQUALS.findall(pred)) > 1 or _JOINED.search(pred):
        return False
    from sympy import Eq, Symbol

    head = pred_parsed[0]
    return isinstance(head, Eq) and isinstance(head.lhs, Symbol)


def equivalent(gold: str, pred: str, inner_timeout: int) -> bool:
    """Whether `pred` equals `gold` according to math-verify (parse both, then verify).

    Only the LaTeX extractor is used: math-verify's plain-expression extractor goes through
    sympy's `parse_expr`, which `eval`s generated Python code, and model output must never reach
    an `eval`. Plain answers such as `1/2` or `0.5` parse as LaTeX just as well. A gold answer
    that is not an equation needs an answer that states one value (:func:`_one_value`); joined
    equations are compared as lists (:func:`_equations_as_list`)."""
    from math_verify import LatexExtractionConfig, parse, verify

    gold, pred = _equations_as_list(gold), _equations_as_list(pred)
    config = [LatexExtractionConfig()]
    gold_parsed = parse(_wrap(gold), extraction_config=config, parsing_timeout=inner_timeout)
    pred_parsed = parse(_wrap(pred), extraction_config=config, parsing_timeout=inner_timeout)
    if not gold_parsed or not pred_parsed or not _one_value(gold, pred, pred_parsed):
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=inner_timeout))


def main() -> None:
    """Serve equivalence checks on stdin/stdout until EOF."""
    logging.disable(logging.CRITICAL)
    sys.setrecursionlimit(10_000)
    import math_verify  # noqa: F401 - pay the import before announcing readiness

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            ok = equivalent(
                str(request["gold"]), str(request["pred"]), int(request.get("inner_timeout", 2))
            )
        except BaseException:  # noqa: BLE001 - any failure is "not equivalent"
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


if __name__ == "__main__":
    main()
