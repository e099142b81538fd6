"""vp2o.arms: each arm loads onto the demo's RL config, validates for ``vp2o train``, and changes
exactly the keys it is meant to change (the expected values are written out here, not read back
from the arm's strings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vp2o.arms import ARMS, BASELINE, arm_overrides
from vp2o.config import load_config, to_dict

BASE = Path(__file__).resolve().parents[1] / "examples" / "vp2o" / "configs" / "shared" / \
    "demo_rl.yaml"

INTENDED = {
    "grpo": {"algorithm": "grpo"},
    "vp2o": {"algorithm": "vp2o"},
    "vp2o_no_transport": {"algorithm": "vp2o", "vp2o.alpha": 0.0, "vp2o.attraction": False},
    "vp2o_no_specialisation": {"algorithm": "vp2o", "vp2o.ortho_coeff": 0.0,
                               "vp2o.variance_coeff": 0.0},
    "vp2o_clip": {"algorithm": "vp2o", "loss.clip": True, "vp2o.trust_region.enabled": False},
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_arms_are_the_studys_five():
    assert list(ARMS) == list(INTENDED)
    assert BASELINE == "grpo"


@pytest.mark.parametrize("arm", list(INTENDED))
def test_an_arm_validates_and_changes_only_its_keys(arm):
    base = _flat(to_dict(load_config(BASE, loop="train")))
    got = _flat(to_dict(load_config(BASE, arm_overrides(arm), loop="train")))
    assert set(got) == set(base)
    changed = {k: v for k, v in got.items() if v != base[k]}
    intended = {k: v for k, v in INTENDED[arm].items() if v != base[k]}
    assert changed == intended
    assert all(got[k] == v for k, v in INTENDED[arm].items())


def test_an_unknown_arm_names_itself_and_the_known_ones():
    with pytest.raises(ValueError, match="unknown arm 'vp2o_nope'") as e:
        arm_overrides("vp2o_nope")
    assert all(name in str(e.value) for name in ARMS)
    got = arm_overrides("vp2o")
    got.append("x=1")  # a copy: the table is not changed
    assert ARMS["vp2o"] == ["algorithm=vp2o"]
