"""A lean no-autograd forward of a megatron-core ``GPTModel`` for generation (issue 21, item 3).

megatron's forward is written for training at scale: every linear layer goes through an
autograd ``Function`` (async all-reduce, gradient-accumulation fusion), the MoE layer through a
token dispatcher (permute, all-to-all and unpermute bookkeeping even at EP = 1), the attention
through its inference-context plumbing. At generation's shapes on a CPU (a few dozen rows, one
token each) those Python layers cost more than the arithmetic: a decode step of the demo model
took ~9 ms in megatron's forward for 4 layers (docs/results.md, section 2).

:class:`LeanForward` computes the same function from the model's own parameters (read at each
call, never copied: an optimizer step is seen by the next call), with plain tensor ops:

- embedding, norms, q/k norms and shared-expert / dense MLPs: megatron's own modules, called as
  they are (cheap, and their semantics stay megatron's);
- attention: ``F.linear`` for QKV (megatron's per-query-group ``[q heads, k, v]`` layout) and the
  output projection, RoPE by column (megatron's static inference indexes its rotary table by
  column: ``vp2o.rollout.masks``) from megatron's own rotary table, a KV cache of its own
  ``[N, groups, S, hn]`` per layer, and ``scaled_dot_product_attention`` with grouped-query
  heads and the rollout's boolean mask;
- MoE: the router's weight in its ``moe_router_dtype``, megatron's
  ``topk_routing_with_score_function`` (softmax / sigmoid, pre-softmax, groups, scaling, expert
  bias: its semantics, not a copy), then the routed experts on rows sorted by expert: one
  ``torch._grouped_mm`` per projection for vp2o's ``GroupedExperts``, one ``F.linear`` per
  expert for megatron's ``SequentialMLP``; gates applied after the activation (megatron's
  order) and the k outputs of a token summed.

It also returns each MoE layer's selected experts and gates, so generation records routing
without hooks, and it retires finished rows: once a quarter of the cached rows are done
(``RETIRE_BELOW``), their keys and values leave the cache and later steps compute only the rest
(megatron's static loop computes every row to the end).

What it does not cover it refuses at construction with :class:`Unsupported` and the reason
(tensor, pipeline, context or expert parallelism, transformer-engine modules, token dropping,
expert biases, multi-token prediction, ...); ``vp2o.rollout.generate`` then runs megatron's
forward. Tested against megatron's forward (logits, routing, generations) in
tests/rollout/test_lean_forward.py.

Glossary: N rows, T columns of this call, S cache columns, h hidden, np query heads, ng query
groups, hn head dim, E experts, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Unsupported(Exception):
    """The model has something :class:`LeanForward` does not compute (the message says what)."""


def _gpt_model(model: torch.nn.Module):
    from megatron.core.models.gpt import GPTModel

    for module in model.modules():
        if isinstance(module, GPTModel):
            return module
    raise Unsupported(f"no megatron GPTModel inside {type(model).__name__}")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise Unsupported(what)


def _check_config(c) -> None:
    """Options that change the forward in ways this module does not reproduce."""
    sizes = {
        "tensor_model_parallel_size": c.tensor_model_parallel_size,
        "pipeline_model_parallel_size": c.pipeline_model_parallel_size,
        "context_parallel_size": c.context_parallel_size,
        "expert_model_parallel_size": c.expert_model_parallel_size,
    }
    for name, size in sizes.items():
        _require(size == 1, f"{name} = {size} (the lean forward runs one whole model per rank)")
    flags = {
        "sequence_parallel": c.sequence_parallel,
        "fp32_residual_connection": c.fp32_residual_connection,
        "apply_residual_connection_post_layernorm": c.apply_residual_connection_post_layernorm,
        "apply_query_key_layer_scaling": c.apply_query_key_layer_scaling,
        "rotary_interleaved": c.rotary_interleaved,
        "moe_apply_probs_on_input": c.moe_apply_probs_on_input,
        "attention_output_gate": getattr(c, "attention_output_gate", False),
        "multi_latent_attention": getattr(c, "multi_latent_attention", False),
        "fp8": bool(c.fp8),
        "fp4": bool(getattr(c, "fp4", None)),
    }
    for name, on in flags.items():
        _require(not on, f"{name} is set")
    _require(c.moe_expert_capacity_factor is None,
             "moe_expert_capacity_factor is set (token dropping)")
    _require(c.window_size is None, "sliding-window attention")
    _require(getattr(c, "softmax_type", "vanilla") == "vanilla",
             f"softmax_type = {getattr(c, 'softmax_type', None)!r}")
    _require(not getattr(c, "mtp_num_layers", None), "multi-token prediction layers")


class _Attention:
    """One layer's self-attention with its own KV cache."""

    def __init__(self, layer, num_rows: int, max_len: int, dtype: torch.dtype) -> None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.identity_op import IdentityOp

        attn = layer.self_attention
        core = attn.core_attention
        _require(type(core).__name__ in ("DotProductAttention", "SDPAttention")
                 and isinstance(core, DotProductAttention),
                 f"core attention {type(core).__name__} (megatron's local one or vp2o's sdpa)")
        _require(isinstance(getattr(layer, "cross_attention", IdentityOp()), IdentityOp),
                 "cross-attention")
        for name in ("linear_qkv", "linear_proj"):
            lin = getattr(attn, name)
            _require(isinstance(getattr(lin, "weight", None), torch.Tensor)
                     and type(lin).__name__ in ("ColumnParallelLinear", "RowParallelLinear"),
                     f"{name} is {type(lin).__name__} (megatron's local linear layers)")
        self.attn = attn
        self.heads = attn.num_attention_heads_per_partition  # np
        self.groups = attn.num_query_groups_per_partition  # ng
        self.head_dim = attn.hidden_size_per_attention_head  # hn
        self.scale = getattr(core, "sdpa_scale", core.softmax_scale)
        self.q_norm = attn.q_layernorm
        self.k_norm = attn.k_layernorm
        shape = (num_rows, self.groups, max_len, self.head_dim)
        device = attn.linear_qkv.weight.device
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [N, ng, S, hn]
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def __call__(self, x: torch.Tensor, start: int, allowed: torch.Tensor,
                 cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        """x [T, N, h] at columns start .. start+T-1 -> attention output [T, N, h]."""
        attn, t, n = self.attn, x.shape[0], x.shape[1]
        qkv = F.linear(x, attn.linear_qkv.weight, attn.linear_qkv.bias)
        per_group = self.heads // self.groups
        qkv = qkv.view(t, n, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = torch.split(
            qkv, [per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(t, n, self.heads, self.head_dim)  # [T, N, np, hn] group-major heads
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        end = start + t
        self.keys[:, :, start:end] = k.permute(1, 2, 0, 3)  # [N, ng, T, hn]
        self.values[:, :, start:end] = v.permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3),  # [N, np, T, hn]
            self.keys[:, :, :end], self.values[:, :, :end],
            attn_mask=allowed, scale=self.scale, enable_gqa=self.groups != self.heads,
        )  # [N, np, T, hn]
        out = out.permute(2, 0, 1, 3).reshape(t, n, self.heads * self.head_dim)
        return F.linear(out, attn.linear_proj.weight, attn.linear_proj.bias)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE on the first ``cos.shape[-1]`` features of x [T, N, heads, hn];
    cos/sin [T, 1, 1, rot] in x's dtype (megatron's formula: x cos + rotate_half(x) sin)."""
    rot = cos.shape[-1]
    part = x[..., :rot]
    x1, x2 = part.chunk(2, dim=-1)
    turned = part * cos + torch.cat((-x2, x1), dim=-1) * sin
    return turned if rot == x.shape[-1] else torch.cat((turned, x[..., rot:]), dim=-1)


class _MoE:
    """One MoE layer: router, routed experts on expert-sorted rows, shared experts."""

    def __init__(self, mlp) -> None:
        from megatron.core.transformer.moe.experts import SequentialMLP
        from megatron.core.transformer.moe.router import TopKRouter

        router, experts = mlp.router, mlp.experts
        _require(isinstance(router, TopKRouter) and router.routing_type != "sinkhorn",
                 f"router {type(router).__name__} ({getattr(router, 'routing_type', '?')})")
        # vp2o.mcore.grouped_experts.GroupedExperts, recognised by its stacked weights (this
        # package sits below vp2o.mcore and does not import it): weight1 [E, 2f or f, h],
        # weight2 [E, h, f]
        self.grouped = (type(experts).__name__ == "GroupedExperts"
                        and getattr(experts, "weight1", None) is not None
                        and experts.weight1.dim() == 3)
        _require(self.grouped or isinstance(experts, SequentialMLP),
                 f"experts {type(experts).__name__} (GroupedExperts or SequentialMLP)")
        if isinstance(experts, SequentialMLP):
            for e in experts.local_experts:
                _require(e.linear_fc1.bias is None and e.linear_fc2.bias is None,
                         "expert biases (add_bias_linear)")
        self.mlp, self.router, self.experts = mlp, router, experts
        c = router.config
        self.config = c
        self.router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            c.moe_router_dtype)
        self.num_experts = c.num_moe_experts
        self.topk = router.topk

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T', h] -> (probs [T', E], routing_map [T', E] bool), megatron's routing."""
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        c, router = self.config, self.router
        dtype = self.router_dtype or x.dtype
        bias = None if router.bias is None else router.bias.to(dtype)
        logits = F.linear(x.to(dtype), router.weight.to(dtype), bias)  # [T', E]
        return topk_routing_with_score_function(
            logits, self.topk, use_pre_softmax=c.moe_router_pre_softmax,
            num_groups=c.moe_router_num_groups, group_topk=c.moe_router_group_topk,
            scaling_factor=c.moe_router_topk_scaling_factor,
            score_function=router.score_function, expert_bias=router.expert_bias,
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, N, h] -> (output [T, N, h], ids [T*N, k], gates [T*N, k]) with ids ascending
        per token and gates as passed to the experts (fp32)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T', h], megatron's token order s * N + n
        probs, routing_map = self.route(flat)
        # [T', k]: the k selected experts of each token, ascending ids, and their gates
        gates, ids = torch.topk(probs.float().masked_fill(~routing_map, -1.0), self.topk, -1)
        ids, order = torch.sort(ids, dim=-1)
        gates = torch.gather(gates, 1, order)
        flat_ids = ids.reshape(-1)  # [T' k]
        by_expert = torch.argsort(flat_ids, stable=True)  # rows grouped by expert
        token = by_expert // self.topk  # [T' k] source token of each sorted row
        rows = flat.index_select(0, token)  # [T' k, h]
        row_gates = gates.reshape(-1).index_select(0, by_expert)  # [T' k] fp32
        counts = torch.bincount(flat_ids, minlength=self.num_experts)  # [E]
        out_rows = self._experts(rows, counts, row_gates)  # [T' k, h]
        out = torch.zeros_like(flat).index_add_(0, token, out_rows)
        out = out.view(shape)
        if self.mlp.shared_experts is not None:
            out = out + self.mlp.shared_experts(x)
        return out, ids, gates

    def _activate(self, h: torch.Tensor, gates: torch.Tensor, dtype: torch.dtype):
        c = self.config
        if c.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            h = c.activation_func(gate) * up
        else:
            h = c.activation_func(h)
        return (h * gates.unsqueeze(-1)).to(dtype)

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor, gates: torch.Tensor):
        """rows [R, h] grouped by expert, counts [E], gates [R] -> [R, h] gated outputs."""
        ex = self.experts
        if self.grouped:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] block ends
            h = torch._grouped_mm(rows, ex.weight1.transpose(1, 2), offs=offs)
            h = self._activate(h, gates, rows.dtype)
            return torch._grouped_mm(h, ex.weight2.transpose(1, 2), offs=offs)
        out, begin = torch.empty_like(rows), 0
        for expert, count in zip(ex.local_experts, counts.tolist(), strict=True):  # host sync
            if count:
                part = slice(begin, begin + count)
                h = F.linear(rows[part], expert.linear_fc1.weight)
                h = self._activate(h, gates[part], rows.dtype)
                out[part] = F.linear(h, expert.linear_fc2.weight)
                begin += count
        return out


RETIRE_BELOW = 0.75
"""Finished rows leave the cache once the active rows are at most this share of the cached ones
(each retirement copies the cache once; at this share the copies cost at most 4x one cache)."""


@dataclass
class LeanOutput:
    """One call's outputs, for the R rows still cached (``rows``, ascending row ids).

    Attributes:
        logits: [R, V] float32 of the last column.
        routing: per MoE layer in layer order, (ids [R, T, k] ascending, gates [R, T, k] fp32).
        rows: [R] int64 row ids into the batch the forward was built for.
    """

    logits: torch.Tensor
    routing: list[tuple[torch.Tensor, torch.Tensor]]
    rows: torch.Tensor


class LeanForward:
    """Generation's forward of ``model`` (a megatron ``GPTModel``, possibly wrapped) with a KV
    cache for ``num_rows`` rows of up to ``max_len`` columns. Call it once per prefill or
    decode step, columns in order; no autograd (call under ``torch.no_grad``).

    Raises:
        Unsupported: the model has something this forward does not compute (see the module).
    """

    def __init__(self, model: torch.nn.Module, num_rows: int, max_len: int) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_layer import TransformerLayer

        gpt = _gpt_model(model)
        config = gpt.config
        _check_config(config)
        _require(gpt.pre_process and gpt.post_process, "a pipeline stage, not the whole model")
        _require(getattr(gpt, "mtp_process", False) is False, "multi-token prediction")
        _require(gpt.position_embedding_type in ("rope", "none", "learned_absolute"),
                 f"position_embedding_type = {gpt.position_embedding_type!r}")
        if gpt.position_embedding_type == "rope":
            from megatron.core.models.common.embeddings.rotary_pos_embedding import (
                RotaryEmbedding,
            )

            _require(type(gpt.rotary_pos_emb) is RotaryEmbedding,
                     f"rotary embedding {type(gpt.rotary_pos_emb).__name__}")
        self.gpt = gpt
        self.dtype = gpt.embedding.word_embeddings.weight.dtype
        self.attention, self.mlps = [], []
        for layer in gpt.decoder.layers:
            _require(type(layer) is TransformerLayer, f"decoder layer {type(layer).__name__}")
            self.attention.append(_Attention(layer, num_rows, max_len, self.dtype))
            self.mlps.append(_MoE(layer.mlp) if isinstance(layer.mlp, MoELayer) else None)
        self.layers = list(gpt.decoder.layers)
        self.topk = next((m.topk for m in self.mlps if m is not None), 0)
        cos = sin = None
        if gpt.position_embedding_type == "rope":
            freqs = gpt.rotary_pos_emb(max_len)  # [S, 1, 1, rot] fp32, indexed by column
            cos, sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
        self.cos, self.sin = cos, sin
        self.max_len = max_len
        device = gpt.embedding.word_embeddings.weight.device
        self.rows = torch.arange(num_rows, device=device)  # [R] the rows in the cache

    @property
    def num_moe_layers(self) -> int:
        """MoE layers (the routing returned per call has one entry per MoE layer)."""
        return sum(m is not None for m in self.mlps)

    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor, start: int,
                 blocked: torch.Tensor, *, temperature: float = 1.0,
                 active: torch.Tensor | None = None) -> LeanOutput:
        """One forward over columns ``start .. start + T - 1`` of the rows still cached.

        Args:
            tokens, position_ids: [N, T] int64 of all N rows (positions feed learned absolute
                embeddings only; RoPE is by column, as in megatron's static inference).
            start: the first column (every earlier column is in the cache).
            blocked: [N, 1, T, start + T] bool, True where attention is blocked
                (``vp2o.rollout.masks.attention_mask``).
            temperature: the logits are divided by it (the rollout's log-prob temperature).
            active: [N] bool, the rows whose outputs are still wanted (a real token in these
                columns); once they are at most ``RETIRE_BELOW`` of the cached rows, the others
                leave the cache for good (their keys and values are dropped). None = all cached.

        Returns:
            :class:`LeanOutput` for the cached rows (a superset of ``active``).
        """
        if active is not None:
            self._retire(active)
        rows = self.rows
        if rows.numel() < tokens.shape[0]:
            tokens, position_ids, blocked = (
                a.index_select(0, rows) for a in (tokens, position_ids, blocked))
        gpt, (n, t) = self.gpt, tokens.shape
        _require(start + t <= self.max_len, f"columns up to {start + t} > {self.max_len}")
        x = gpt.embedding(input_ids=tokens, position_ids=position_ids)  # [T, R, h]
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        allowed = ~blocked
        routing = []
        for layer, attention, moe in zip(self.layers, self.attention, self.mlps, strict=True):
            x = x + attention(layer.input_layernorm(x), start, allowed, cos, sin)
            h = layer.pre_mlp_layernorm(x)
            if moe is None:
                out, bias = layer.mlp(h)
                x = x + out if bias is None else x + out + bias
            else:
                out, ids, gates = moe(h)
                x = x + out
                routing.append((ids.view(t, n, -1).transpose(0, 1),  # rows s * R + r
                                gates.view(t, n, -1).transpose(0, 1)))
        last = x[-1]  # [R, h]
        if gpt.decoder.final_layernorm is not None:
            last = gpt.decoder.final_layernorm(last)
        weight = (gpt.shared_embedding_or_output_weight()
                  if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight)
        logits = F.linear(last, weight, gpt.output_layer.bias)  # [R, V]
        if temperature != 1.0:  # in the model's dtype, as vp2o.rollout.logprobs' hook divides
            logits = logits / temperature
        return LeanOutput(logits=logits.float(), routing=routing, rows=rows)

    def _retire(self, active: torch.Tensor) -> None:
        """Drop the cached rows outside ``active`` once they are enough to pay for the copy."""
        keep = active.to(self.rows.device).index_select(0, self.rows)  # [R] bool
        # one host sync (generation syncs once per step anyway)
        kept, wanted = torch.stack([keep.sum(), active.sum().to(keep.device)]).tolist()
        if kept != wanted:
            raise ValueError("LeanForward: a row asked for after it left the cache")
        if kept > RETIRE_BELOW * self.rows.numel():
            return
        slots = keep.nonzero().squeeze(1)
        self.rows = self.rows.index_select(0, slots)
        for attention in self.attention:
            attention.keys = attention.keys.index_select(0, slots)
            attention.values = attention.values.index_select(0, slots)
