"""Rollouts: batched sampling from the megatron-core model with a KV cache, and the learner's
teacher-forced log-probs over the same layout (see docs/rollout.md)."""

from vp2o.rollout.generate import generate
from vp2o.rollout.logprobs import sequence_logprobs, temperature_scaled
from vp2o.rollout.masks import attention_mask, left_pad, position_ids
from vp2o.rollout.routing import RoutingRecorder, replay_indices
from vp2o.rollout.sampling import SamplingParams, logprob_temperature
from vp2o.rollout.types import RolloutBatch

__all__ = [
    "RolloutBatch",
    "RoutingRecorder",
    "SamplingParams",
    "attention_mask",
    "generate",
    "left_pad",
    "logprob_temperature",
    "position_ids",
    "replay_indices",
    "sequence_logprobs",
    "temperature_scaled",
]
