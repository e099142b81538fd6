"""``rollout.engine=megatron``: the learner's own megatron model through :func:`generate`.

The engine holds a reference to the learner's model, so it always samples with the current
weights (``update_weights`` has nothing to load) and its behaviour log-probs are the learner's
forward at the same weights (``exact``: the same function, rounded in another order by the lean
forward, within 1e-5 in fp32). Routes come from the lean forward, or :class:`RoutingRecorder`
on megatron's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from vp2o.rollout.engine import ENGINES
from vp2o.rollout.generate import generate
from vp2o.rollout.sampling import SamplingParams
from vp2o.rollout.types import RolloutBatch


@ENGINES.register("megatron")
class MegatronEngine:
    """Generation with :func:`vp2o.rollout.generate` on ``model`` (the learner's, shared).

    Args:
        model: the megatron ``GPTModel`` of this rank.
        tokenizer: has ``eos_id``, ``pad_id``, ``decode``.
        sync_group: ranks that must run the same number of forwards (see ``generate``).
        lean: generate with the lean forward where it supports the model (``rollout.lean_decode``).
    """

    name = "megatron"
    exact = True
    shares_weights = True
    returns_routes = True

    def __init__(self, model: torch.nn.Module, tokenizer,
                 sync_group: dist.ProcessGroup | None = None, *, lean: bool = True) -> None:
        self.model, self.tokenizer, self.sync_group = model, tokenizer, sync_group
        self.lean = lean

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, *,
                 generator: torch.Generator | Sequence[torch.Generator]) -> RolloutBatch:
        """See :meth:`vp2o.rollout.engine.RolloutEngine.generate`; ``generate`` runs in eval
        mode without autograd and restores the model's mode after the call."""
        return generate(self.model, prompts, sampling, tokenizer=self.tokenizer,
                        generator=generator, sync_group=self.sync_group, lean=self.lean)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to load: the engine reads the learner's parameters."""

    def sleep(self) -> None:
        """No-op (nothing is held between rollouts)."""

    def wake(self) -> None:
        """No-op."""
