"""vp2o: RL post-training (GRPO and VP2O) for Mixture-of-Experts models on megatron-core."""

import sys
from importlib.abc import MetaPathFinder

__version__ = "0.1.0"


class _BeforeMegatron(MetaPathFinder):
    """Runs ``vp2o.mcore.cpu.defer_compile_decorations`` once, just before the first import of
    megatron-core in this process (whichever vp2o module gets there first), then steps aside:
    megatron applies its ``torch.compile`` decorations while it is imported, and on a CPU each
    one would load dynamo and inductor for fusions vp2o never runs (see vp2o/mcore/cpu.py). It
    finds nothing itself; the usual finders import megatron."""

    def find_spec(self, name, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            sys.meta_path.remove(self)
            from vp2o.mcore import cpu

            cpu.defer_compile_decorations()
        return None


if "megatron" not in sys.modules:
    sys.meta_path.insert(0, _BeforeMegatron())
