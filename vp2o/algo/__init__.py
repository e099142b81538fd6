"""VP2O and GRPO algorithm core: pure functions over tensors (no megatron, no torch.distributed).

Modules: `grpo` (§1-§2), `stein` (§3-§8), `specialization` (§9), `trust_region` (§10-§11), section
numbers referring to `shared/design/vp2o-method.md`. See `docs/algorithm.md`.
"""

from vp2o.algo import grpo, specialization, stein, trust_region

__all__ = ["grpo", "specialization", "stein", "trust_region"]
