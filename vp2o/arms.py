"""The study's arms: GRPO, VP2O and VP2O's ablations, each a list of config overrides.

    vp2o train --config examples/vp2o/configs/demo_grpo.yaml $(python -c \
        "from vp2o.arms import arm_overrides; print(' '.join(arm_overrides('vp2o_clip')))")

An arm is what ``vp2o train`` accepts after ``--config``: ``key=value`` strings applied on top of
a config file, so the arms differ from one another only in these keys and share everything else
(model, data, budget, schedule, seed). ``benchmarks/study.py`` runs them by name.

- ``grpo``: the clipped GRPO baseline (method §1).
- ``vp2o``: VP2O with the method's defaults (Stein transport, specialisation losses, trust
  regions; §2-§12).
- ``vp2o_no_transport``: VP2O without the Stein transport: no repulsion (``vp2o.alpha=0``) and
  no attraction (``vp2o.attraction=false``), so the transform is the identity; the
  specialisation losses and the trust regions stay.
- ``vp2o_no_specialisation``: VP2O without the specialisation losses (orthogonality and routing
  variance coefficients 0); the transport and the trust regions stay.
- ``vp2o_clip``: VP2O with GRPO's clipped ratio in place of the anchor trust region (§10 off).
"""

from __future__ import annotations

BASELINE = "grpo"
"""The arm every other arm is compared with (paired by seed)."""

ARMS: dict[str, list[str]] = {
    "grpo": ["algorithm=grpo"],
    "vp2o": ["algorithm=vp2o"],
    "vp2o_no_transport": ["algorithm=vp2o", "vp2o.alpha=0", "vp2o.attraction=false"],
    "vp2o_no_specialisation": ["algorithm=vp2o", "vp2o.ortho_coeff=0", "vp2o.variance_coeff=0"],
    "vp2o_clip": ["algorithm=vp2o", "loss.clip=true", "vp2o.trust_region.enabled=false"],
}
"""Arm name -> the overrides that make it (``key=value``, as ``vp2o train`` takes them)."""


def arm_overrides(name: str) -> list[str]:
    """The overrides of arm ``name`` (a new list).

    Raises:
        ValueError: ``name`` is not an arm; the message names it and lists the known ones.
    """
    try:
        return list(ARMS[name])
    except KeyError:
        raise ValueError(f"unknown arm {name!r}: expected one of {', '.join(ARMS)}") from None
