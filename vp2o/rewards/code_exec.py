"""The `code` reward: run the completion's program on stdin/stdout tests, return the pass fraction.

The program is the body of the completion's last fenced code block (an unclosed final fence runs to
the end), else the whole completion. It runs as Python 3 in a `Sandbox` (vp2o/rewards/sandbox.py),
once per test, with the test's `input` on stdin; a test passes when the program exits with status 0
within the limits and its stdout equals the expected `output` token for token (whitespace-
normalised: `str.split()` on both sides, as the usual competitive-programming checkers do).

Row fields: `tests` (a list of `{"input": str, "output": str}`), `time_limit` (optional CPU
seconds per test, clamped to `max_time_limit_s`).

A run that hits the wall-clock limit or whose sandbox could not start is run once more, once per
completion: beside a learner (a reward pool on the training host) a load spike can hold a correct
program's start past `wall_s` (we measured 3.1 s for a 0.08 s program while the test suite ran on
2 cores), and a reward that scores a correct program 0.5 at random is noise in the advantage. A
program that really blocks fails both runs and costs one `wall_s` more, within `total_wall_s`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from vp2o.rewards.extract import last_code_block
from vp2o.rewards.registry import register_reward
from vp2o.rewards.sandbox import Sandbox, SandboxLimits

__all__ = ["CodeReward", "extract_program", "outputs_match"]

logger = logging.getLogger(__name__)

MAX_PROGRAM_CHARS = 256_000

RERUN_STATUSES = frozenset({"timeout", "sandbox_error"})
"""Run outcomes that may be the host's doing, not the program's (see the module docstring)."""


def extract_program(completion: str) -> str:
    """The program in `completion`: its last fenced code block, else the whole text."""
    block = last_code_block(completion)
    return completion if block is None else block


def outputs_match(actual: str, expected: str) -> bool:
    """Token-wise equality after splitting both on whitespace."""
    return actual.split() == expected.split()


def _tests(sample: Mapping[str, Any]) -> list[tuple[str, str]]:
    tests = sample.get("tests")
    if not isinstance(tests, list | tuple):
        return []
    pairs = []
    for test in tests:
        if isinstance(test, Mapping) and "output" in test:
            pairs.append((str(test.get("input") or ""), str(test["output"])))
    return pairs


class CodeReward:
    """Pass fraction of a program on `sample["tests"]`, each run sandboxed.

    Args:
        limits: Per-test sandbox limits.
        backend: Sandbox backend ("auto", "bwrap", "rlimit").
        max_time_limit_s: Upper clamp on a row's `time_limit`.
        total_wall_s: Wall-clock budget of all tests of one completion; tests not started within
            it count as failed (an infinite loop should not cost tests x wall_s). The one rerun
            of a timed-out or unstarted test (module docstring) happens only within it.
        make_sandbox: Builds the sandbox for given limits; anything with
            `run(source, stdin) -> RunResult` will do (a container or nsjail runner, say).
            Default: `Sandbox(limits, backend=backend)`.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        backend: str = "auto",
        max_time_limit_s: float = 10.0,
        total_wall_s: float = 60.0,
        make_sandbox: Callable[[SandboxLimits], Sandbox] | None = None,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.backend = backend
        self.max_time_limit_s = max_time_limit_s
        self.total_wall_s = total_wall_s
        self.make_sandbox = make_sandbox or self._default_sandbox
        self._sandboxes: dict[float, Sandbox] = {}

    def _default_sandbox(self, limits: SandboxLimits) -> Sandbox:
        return Sandbox(limits, backend=self.backend)  # type: ignore[arg-type]

    def _sandbox(self, sample: Mapping[str, Any]) -> Sandbox:
        limits = self.limits
        time_limit = sample.get("time_limit")
        if isinstance(time_limit, int | float) and not isinstance(time_limit, bool):
            cpu_s = min(max(float(time_limit), 0.1), self.max_time_limit_s)
            if cpu_s == cpu_s and cpu_s != limits.cpu_s:  # NaN-safe
                scale = limits.wall_s / limits.cpu_s
                limits = dataclasses.replace(limits, cpu_s=cpu_s, wall_s=cpu_s * scale)
        key = limits.cpu_s
        if key not in self._sandboxes:
            self._sandboxes[key] = self.make_sandbox(limits)
        return self._sandboxes[key]

    def __call__(self, prompt: str, completion: str, sample: Mapping[str, Any]) -> float:
        """Score one completion (see the module docstring)."""
        tests = _tests(sample)
        program = extract_program(completion)
        if not tests or not program.strip() or len(program) > MAX_PROGRAM_CHARS:
            return 0.0
        sandbox = self._sandbox(sample)
        wall_s = getattr(sandbox, "limits", self.limits).wall_s
        spent = 0.0
        passed = 0
        rerun_left = True
        for stdin, expected in tests:
            if spent >= self.total_wall_s:
                break
            result = sandbox.run(program, stdin)
            spent += result.wall_s
            fits = spent + wall_s <= self.total_wall_s
            if result.status in RERUN_STATUSES and rerun_left and fits:
                rerun_left = False
                logger.info("code reward: a test ended '%s' after %.1f s; running it once more",
                            result.status, result.wall_s)
                result = sandbox.run(program, stdin)
                spent += result.wall_s
            if result.ok and outputs_match(result.stdout, expected):
                passed += 1
        return passed / len(tests)


register_reward("code")(CodeReward())
