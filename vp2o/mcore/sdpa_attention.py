"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for megatron's local spec.

megatron's local ``DotProductAttention`` materialises the scores and probabilities
``[b, heads, sq, sk]`` of every layer and keeps them for the backward: O(s^2) memory per layer
and head. :class:`SDPAttention` computes the same function with PyTorch's fused kernels
(flash / memory-efficient on CUDA, the fused flash kernel on CPU), which keep O(s) per layer and
head; only the boolean mask the model is given (one ``[b, 1, sq, sk]`` tensor shared by every
layer) stays quadratic. ``model.core_attention = sdpa`` selects it (``vp2o.mcore.model``).

What it keeps from megatron's module: the call signature (``query [sq, b, np, hn]``, ``key`` and
``value [sk, b, ng, hn]``, output ``[sq, b, np * hn]``), the boolean mask convention (True =
blocked; the rollout's causal + padding masks, the packed block-diagonal masks of
``vp2o.mcore.packing`` and the decode masks against the static KV cache are passed as they
are), the softmax scale (1/sqrt(hn), or ``softmax_scale``), grouped-query attention (query head
i reads key/value group i // (np/ng), megatron's ``repeat_interleave`` order) and, with no mask,
megatron's rule: causal when the layer is causal and sq > 1. It subclasses
``DotProductAttention`` (same construction, checkpoint layout and ``isinstance`` checks) and
replaces only ``forward``.

Not supported (refused at build or call, by name): sliding-window attention, softmax variants
other than ``vanilla``, attention bias and megatron's THD ``packed_seq_params`` (vp2o packs
sequences into rows with a block-diagonal mask instead).

Differences a reader may meet: megatron fills blocked scores with -10000 and the fused kernels
with -inf; both give probability exactly 0 in fp32 unless a query row is blocked entirely, which
vp2o's masks never produce (a pad query attends to itself). Attention dropout uses PyTorch's
generator, not megatron's CUDA RNG tracker (RL runs with ``attention_dropout = 0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

CORE_ATTENTION = ("local", "sdpa")
"""Values of ``model.core_attention``: megatron's local ``DotProductAttention`` or
:class:`SDPAttention`."""


class SDPAttention(DotProductAttention):
    """megatron's local core attention computed by ``scaled_dot_product_attention``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     self.layer_number):
            raise NotImplementedError(
                "model.core_attention = sdpa: sliding-window attention (window_size = "
                f"{config.window_size}) is not supported; use model.core_attention = local")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(
                f"model.core_attention = sdpa: softmax_type = {config.softmax_type!r} is not "
                "supported (vanilla only); use model.core_attention = local")
        # megatron divides the scores' scale by the layer number under query-key layer scaling
        # and multiplies the scores by it again inside its softmax: the net scale is this.
        self.sdpa_scale = self.softmax_scale
        if config.apply_query_key_layer_scaling:
            self.sdpa_scale *= self.layer_number

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]``, ``attention_mask``
        bool broadcastable to ``[b, 1, sq, sk]`` (True = blocked) or None -> ``[sq, b, np*hn]``.

        ``attn_mask_type`` is ignored, as by megatron's local module (the layer's own type
        decides the no-mask case).
        """
        if packed_seq_params is not None:
            raise NotImplementedError(
                "model.core_attention = sdpa takes packed sequences as rows with a "
                "block-diagonal mask (vp2o.mcore.packing), not megatron's THD packed_seq_params")
        if attention_bias is not None:
            raise NotImplementedError("model.core_attention = sdpa: attention bias is not "
                                      "supported")
        sq, b, heads, _ = query.shape
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        causal = False
        mask = None
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    f"SDPAttention expects a boolean attention mask (True = blocked), got "
                    f"{attention_mask.dtype}")
            mask = ~attention_mask  # sdpa: True = may attend
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"causal attention without a mask needs sq == sk, got sq = "
                                 f"{sq}, sk = {sk} (pass a mask)")
            causal = True
        dropout = self.attention_dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
            scale=self.sdpa_scale, enable_gqa=k.shape[1] != heads,
        )  # [b, np, sq, hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def install_sdpa_attention(layer_spec):
    """Point a local decoder layer spec's ``core_attention`` at :class:`SDPAttention`.

    Edits ``layer_spec`` in place (pass a copy: megatron's spec helpers share objects) and
    returns it.

    Raises:
        ValueError: the layer's core attention is not megatron's local ``DotProductAttention``
            (the transformer-engine spec has its own fused attention).
    """
    attn = getattr(layer_spec.submodules, "self_attention", None)
    subs = getattr(attn, "submodules", None)
    core = getattr(subs, "core_attention", None)
    if core is not DotProductAttention:
        name = getattr(core, "__name__", type(core).__name__)
        raise ValueError(
            f"model.core_attention = sdpa replaces megatron's local DotProductAttention; this "
            f"layer spec's core attention is {name} (use model.transformer_impl = local)")
    subs.core_attention = SDPAttention
    return layer_spec
