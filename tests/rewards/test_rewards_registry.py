"""The reward registry: lookup, dotted paths, duplicates, and the never-raise wrapper."""

from __future__ import annotations

import math

import pytest

import vp2o.rewards as rewards
from vp2o.rewards import available, get_reward, register_reward
from vp2o.rewards.registry import REWARDS, safe_reward


def always_half(prompt: str, completion: str, sample: dict) -> float:
    """A user reward reachable by dotted path."""
    return 0.5


def test_builtins_registered():
    assert {"math", "choice", "ifeval", "ifeval_loose", "code", "exact"} <= set(available())
    assert available() == sorted(available())


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError) as err:
        get_reward("no_such_reward")
    message = str(err.value)
    for name in ("math", "choice", "ifeval", "code", "exact"):
        assert name in message


@pytest.mark.parametrize("path", [f"{__name__}:always_half", f"{__name__}.always_half"])
def test_dotted_path(path):
    assert get_reward(path)("p", "c", {}) == 0.5


@pytest.mark.parametrize(
    "path", ["no_such_module_xyz:fn", f"{__name__}:missing", f"{__name__}:math"]
)
def test_bad_dotted_path(path):
    with pytest.raises(ValueError):
        get_reward(path)


def test_a_module_that_fails_while_importing_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_mod.py").write_text("x = 1\nraise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot import module 'broken_reward_mod' for reward "
                                         r"'broken_reward_mod:fn': RuntimeError: no GPU here"):
        get_reward("broken_reward_mod:fn")


def test_register_and_duplicate():
    name = "test_registry_dummy"
    try:

        @register_reward(name)
        def dummy(prompt: str, completion: str, sample: dict) -> float:
            return 1.0 if completion == "yes" else 0.0

        assert dummy("", "yes", {}) == 1.0  # the decorator returns the raw function
        assert get_reward(name)("", "yes", {}) == 1.0
        assert name in available()
        with pytest.raises(ValueError, match="already registered"):
            register_reward(name)(dummy)
    finally:
        REWARDS.remove(name)
    with pytest.raises(ValueError):
        register_reward("")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(float("nan"), 0.0), (float("inf"), 0.0), (-3.0, 0.0), (7.0, 1.0), (0.25, 0.25), (True, 1.0)],
)
def test_safe_wrapper_clamps(value, expected):
    assert safe_reward(lambda p, c, s: value)("", "", {}) == expected


def test_safe_wrapper_swallows_exceptions(caplog):
    def boom(prompt, completion, sample):
        raise RuntimeError("bad row")

    def not_a_number(prompt, completion, sample):
        return "abc"

    assert safe_reward(boom, "boom")("", "", {}) == 0.0
    assert "boom" in caplog.text and "RuntimeError" in caplog.text
    assert safe_reward(not_a_number)("", "", {}) == 0.0


def test_safe_wrapper_coerces_inputs():
    seen = []

    def record(prompt, completion, sample):
        seen.append((prompt, completion, sample))
        return 1.0

    fn = safe_reward(record)
    assert fn(None, b"caf\xc3\xa9 \xff", "not a dict") == 1.0
    assert seen[-1] == ("", "café \ufffd", {})
    assert math.isfinite(fn(1, 2, None))


def test_package_exports():
    assert set(rewards.__all__) >= {"available", "get_reward", "register_reward"}
