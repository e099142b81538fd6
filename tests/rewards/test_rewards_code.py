"""The `code` reward: program extraction, pass fraction, time limits, adversarial completions."""

from __future__ import annotations

import dataclasses
import time

import pytest
from reward_cases import ADVERSARIAL

from vp2o.rewards import get_reward
from vp2o.rewards.code_exec import CodeReward, extract_program, outputs_match
from vp2o.rewards.sandbox import RunResult, SandboxLimits

LIMITS = SandboxLimits(cpu_s=1, wall_s=2, memory_mb=512, nproc=32)
# For the tests that expect a program to pass: the sandbox's start-up under a loaded machine
# (the other test worker's multi-process jobs) must not turn a pass into a timeout.
ROOMY = SandboxLimits(cpu_s=10, wall_s=30, memory_mb=512, nproc=32)
ROW = {
    "tests": [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "10 -4\n", "output": "6"},
        {"input": "0 0\n", "output": "0\n"},
    ]
}
SUM = "Here is my solution:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n"


@pytest.fixture(scope="module")
def code_reward():
    """Scores of programs that finish: limits no run comes near."""
    return CodeReward(ROOMY, total_wall_s=120)


@pytest.fixture(scope="module")
def tight_reward():
    """Programs that hang or attack: the limits must stop them quickly."""
    return CodeReward(LIMITS, total_wall_s=20)


def test_correct_program_scores_one(code_reward):
    assert code_reward("", SUM, ROW) == 1.0


def test_wrong_program_scores_zero(code_reward):
    wrong = "```python\na, b = map(int, input().split())\nprint(a - b + 1)\n```"
    assert code_reward("", wrong, ROW) == 0.0


def test_partial_pass_fraction(code_reward):
    partial = "```python\na, b = map(int, input().split())\nprint(a + b if a else 5)\n```"
    assert code_reward("", partial, ROW) == pytest.approx(2 / 3)


def test_runtime_error_scores_zero(code_reward):
    assert code_reward("", "```python\nprint(3)\nraise SystemExit(1)\n```", ROW) == 0.0


def test_infinite_loop_scores_zero_within_limit(tight_reward):
    row = {"tests": ROW["tests"][:1]}
    start = time.monotonic()
    assert tight_reward("", "```python\nwhile True:\n    pass\n```", row) == 0.0
    # the CPU limit ends it; on a loaded host the wall limit may come first, and be rerun once
    assert time.monotonic() - start < 2 * LIMITS.wall_s + 3


def test_total_budget_stops_remaining_tests():
    reward = CodeReward(LIMITS, total_wall_s=0.5)
    row = {"tests": ROW["tests"] * 3}
    start = time.monotonic()
    assert reward("", "```python\nimport time\ntime.sleep(60)\n```", row) == 0.0
    assert time.monotonic() - start < LIMITS.wall_s + 3


def test_row_time_limit_is_used_and_clamped():
    # the wall bound scales with the CPU bound (x30 here: start-up on a loaded machine)
    reward = CodeReward(dataclasses.replace(LIMITS, wall_s=30), max_time_limit_s=1.0)
    row = {"tests": ROW["tests"][:1], "time_limit": 1000}
    assert reward._sandbox(row).limits.cpu_s == 1.0
    row = {"tests": ROW["tests"][:1], "time_limit": 0.5}
    assert reward._sandbox(row).limits.cpu_s == 0.5
    assert reward._sandbox(row).limits.wall_s == 15.0
    assert reward("", SUM, row) == 1.0


def test_whole_completion_used_without_fence(code_reward):
    assert code_reward("", "a, b = map(int, input().split())\nprint(a + b)", ROW) == 1.0


def test_last_fence_wins(code_reward):
    completion = "```python\nprint('draft')\n```\nBetter:\n" + SUM
    assert code_reward("", completion, ROW) == 1.0
    assert extract_program("x\n```\nA\n```\n```py\nB\n```") == "B\n"


def test_prompt_with_solution_does_not_help(code_reward):
    assert code_reward(SUM, "I don't know.", ROW) == 0.0


@pytest.mark.parametrize(
    "row",
    [{}, {"tests": []}, {"tests": "nope"}, {"tests": [{"input": "1"}]}, {"tests": [None, 3]}],
)
def test_rows_without_tests_score_zero(code_reward, row):
    assert code_reward("", SUM, row) == 0.0


def test_outputs_match_is_whitespace_normalised():
    assert outputs_match("1 2\n3\n", "1\n2 3")
    assert outputs_match("  x  \r\n", "x")
    assert not outputs_match("1 2", "12")
    assert not outputs_match("", "0")


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completions(tight_reward, name):
    assert tight_reward("", ADVERSARIAL[name], ROW) == 0.0


def test_registered_reward():
    assert get_reward("code")("", SUM, {"tests": ROW["tests"][:1]}) == 1.0
    assert get_reward("code")(None, None, None) == 0.0


def test_pluggable_sandbox():
    seen = []

    class EchoSandbox:
        """Stands in for a container runner: pretends every program prints its input."""

        def __init__(self, limits):
            self.limits = limits

        def run(self, source, stdin=""):
            seen.append(source)
            return RunResult("ok", 0, stdin, 0.0)

    reward = CodeReward(LIMITS, make_sandbox=EchoSandbox)
    row = {"tests": [{"input": "5", "output": "5"}, {"input": "1", "output": "2"}]}
    assert reward("", "```\nwhatever\n```", row) == 0.5
    assert seen == ["whatever\n"] * 2


class ScriptedSandbox:
    """Plays back run outcomes in order: a stand-in host that stalls when the script says so."""

    def __init__(self, limits, script):
        self.limits = limits
        self.script = list(script)
        self.calls = 0

    def run(self, source, stdin=""):
        self.calls += 1
        status, wall = self.script.pop(0) if self.script else ("ok", 0.1)
        return RunResult(status, 0 if status == "ok" else None,
                         stdin if status == "ok" else "", wall)


ECHO_ROW = {"tests": [{"input": str(i), "output": str(i)} for i in range(4)]}


@pytest.mark.parametrize("stall", ["timeout", "sandbox_error"])
def test_a_stalled_test_is_run_once_more(stall):
    box = ScriptedSandbox(LIMITS, [("ok", 0.1), (stall, 2.0)])
    reward = CodeReward(LIMITS, make_sandbox=lambda limits: box)
    assert reward("", "```\nx\n```", ECHO_ROW) == 1.0  # the rerun of test 2 passes
    assert box.calls == 5


def test_only_one_rerun_per_completion():
    # a program that blocks on every test: one rerun, then each test fails once
    box = ScriptedSandbox(LIMITS, [("timeout", 2.0)] * 10)
    reward = CodeReward(LIMITS, total_wall_s=100, make_sandbox=lambda limits: box)
    assert reward("", "```\nx\n```", ECHO_ROW) == 0.0
    assert box.calls == 4 + 1


def test_program_failures_are_not_rerun():
    box = ScriptedSandbox(LIMITS, [("error", 0.5), ("output_limit", 0.5)])
    reward = CodeReward(LIMITS, make_sandbox=lambda limits: box)
    assert reward("", "```\nx\n```", ECHO_ROW) == 0.5
    assert box.calls == 4


def test_no_rerun_past_the_budget():
    # 1 s spent, a 2 s wall limit: a rerun would end past total_wall_s = 2.5
    box = ScriptedSandbox(LIMITS, [("timeout", 1.0)])
    reward = CodeReward(LIMITS, total_wall_s=2.5, make_sandbox=lambda limits: box)
    assert reward("", "```\nx\n```", {"tests": ECHO_ROW["tests"][:1]}) == 0.0
    assert box.calls == 1
