"""Sleep mode between rollouts (``rollout.sleep_between_rollouts``, GPU vLLM): the session's
engine is woken before its weight sync and put to sleep after each generation, also when the
generation raises; VLLMEngine's sleep/wake reach vLLM once per transition (level 1). vLLM's
sleep mode needs a GPU, so fakes stand in for the engine and for ``vllm.LLM``."""

from __future__ import annotations

import types

import pytest
import torch

from vp2o import engines
from vp2o.rollout.vllm_engine import VLLMEngine


class _Engine:
    shares_weights = True  # no weight sync

    def __init__(self) -> None:
        self.calls: list[str] = []

    def wake(self) -> None:
        self.calls.append("wake")

    def sleep(self) -> None:
        self.calls.append("sleep")

    def generate(self) -> None:
        self.calls.append("generate")


def test_awake_engine_wakes_before_and_sleeps_after_even_on_error():
    model = torch.nn.Linear(2, 2)
    s = types.SimpleNamespace(model=model, closers=[])
    fake = _Engine()
    engines._ENGINES[model] = engines._Held(fake, None)
    try:
        with engines.awake_engine(s) as engine:
            engine.generate()
        assert fake.calls == ["wake", "generate", "sleep"]
        with pytest.raises(RuntimeError, match="boom"), engines.awake_engine(s):
            raise RuntimeError("boom")
        assert fake.calls[3:] == ["wake", "sleep"]
    finally:
        engines._ENGINES.pop(model)


def test_vllm_engine_sleeps_and_wakes_once_per_transition():
    calls = []
    llm = types.SimpleNamespace(sleep=lambda level: calls.append(("sleep", level)),
                                wake_up=lambda: calls.append(("wake_up",)))
    engine = object.__new__(VLLMEngine)  # no vllm.LLM: its sleep mode needs a GPU
    engine.llm, engine.sleep_mode, engine.asleep = llm, True, False
    engine.wake()  # awake already: nothing
    engine.sleep()
    engine.sleep()
    engine.wake()
    engine.wake()
    assert calls == [("sleep", 1), ("wake_up",)]
    engine.sleep_mode = False  # the CPU, or sleep_between_rollouts off: never
    engine.sleep()
    assert calls == [("sleep", 1), ("wake_up",)] and not engine.asleep
