"""vp2o: RL post-training (GRPO and VP2O) for Mixture-of-Experts models on megatron-core."""

__version__ = "0.1.0"
