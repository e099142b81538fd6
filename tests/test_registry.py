"""vp2o.registry.Registry, the one name -> entry registry every module uses."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vp2o.registry
from vp2o.convert.families import FAMILIES
from vp2o.convert.tensors import LAYOUTS, ConvertError
from vp2o.data.tokenizer import TOKENIZERS
from vp2o.eval_formats import FORMATS
from vp2o.registry import Registry
from vp2o.rewards.ifeval import INSTRUCTIONS
from vp2o.rewards.registry import REWARDS


class _Odd(ValueError):
    pass


def test_register_get_and_order() -> None:
    reg: Registry[int] = Registry("widget")
    assert reg.register("b")(2) == 2  # the decorator returns the entry unchanged
    assert reg.add("a", 1) == 1
    assert reg.get("a") == 1 and reg["b"] == 2
    assert list(reg) == ["b", "a"] and reg.values() == [2, 1]  # registration order
    assert reg.names() == ("a", "b") and len(reg) == 2
    assert "a" in reg and "c" not in reg and ["a"] not in reg
    reg.remove("a")
    reg.remove("a")  # absent: ignored
    assert reg.names() == ("b",)


def test_duplicate_is_refused_and_keeps_the_first() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(ValueError, match=r"^widget 'a' is already registered$"):
        reg.register("a")(2)
    assert reg["a"] == 1


def test_unknown_name_names_the_kind_the_name_and_the_choices() -> None:
    reg: Registry[int] = Registry("widget", error=_Odd)
    reg.add("zeta", 1)
    reg.add("alpha", 2)
    with pytest.raises(_Odd, match=r"^unknown widget 'beta'; choose one of: alpha, zeta$"):
        reg.get("beta")
    with pytest.raises(_Odd, match="unknown widget"):
        reg[["not", "hashable"]]  # type: ignore[index]


def test_every_registry_of_vp2o_is_one() -> None:
    registries = {
        "benchmark format": FORMATS,
        "family": FAMILIES,
        "instruction": INSTRUCTIONS,
        "reward": REWARDS,
        "tensor layout": LAYOUTS,
        "tokenizer kind": TOKENIZERS,
    }
    for kind, reg in registries.items():
        assert isinstance(reg, Registry) and reg.kind == kind and len(reg) > 0
    assert LAYOUTS.error is ConvertError and FAMILIES.error is ConvertError


def test_registry_is_a_leaf_module() -> None:
    """vp2o.algo, vp2o.rewards and vp2o.data import it: it must import nothing from vp2o."""
    tree = ast.parse(Path(vp2o.registry.__file__).read_text())
    imported = [
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    ]
    assert not [m for m in imported if m and m.split(".")[0] == "vp2o"], imported
