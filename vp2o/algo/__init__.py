"""VP2O and GRPO algorithm core: pure functions over tensors (no megatron, no torch.distributed).

Modules: `grpo` (§1-§2), `stein` (§3-§8), `specialization` (§9), `trust_region` (§10-§11), section
numbers referring to `shared/design/vp2o-method.md`; `mismatch` (engine vs learner log-probs and
their TIS/MIS corrections, outside the method). See `docs/algorithm.md`.
"""

from vp2o.algo import grpo, mismatch, specialization, stein, trust_region

__all__ = ["grpo", "mismatch", "specialization", "stein", "trust_region"]
