"""The toy-size trainer config shared by the end-to-end and reliability tests (importable because
tests/conftest.py puts tests/ on sys.path)."""

TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.num_experts=4",
    "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64", "model.vocab_size=64",
    "model.max_position_embeddings=64", "data.num_train_prompts=64", "data.num_eval_prompts=8",
    "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=4",
    "rollout.micro_batch_size=8", "reward.workers=0", "optimizer.lr=1e-3",
    "optimizer.decay_style=constant", "optimizer.weight_decay=0.0",
]
