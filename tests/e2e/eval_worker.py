"""``vp2o eval`` with a small generation chunk, so that a few prompts make several chunks per rank
(the multi-rank evaluation test): ``python eval_worker.py CHUNK ARGS`` runs ``vp2o eval ARGS``.

``reward.name=eval_worker:parity_reward`` is a reward with signal on an untrained model.
"""

from __future__ import annotations

import functools
import sys


def parity_reward(prompt: str, completion: str, sample: dict) -> float:
    """1 when the code points of the completion add up to an even number, else 0."""
    return float(sum(map(ord, completion)) % 2 == 0)


def main(argv: list[str]) -> int:
    from vp2o import evaluate
    from vp2o.cli import main as vp2o_main

    chunk = int(argv[0])
    evaluate.evaluate = functools.partial(evaluate.evaluate, chunk=chunk)
    evaluate.evaluate_rows = functools.partial(evaluate.evaluate_rows, chunk=chunk)
    return vp2o_main(["eval", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
