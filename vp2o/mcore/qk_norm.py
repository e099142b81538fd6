"""Full-width q/k RMSNorm (OLMoE) as megatron's ``q_layernorm`` / ``k_layernorm`` submodules.

megatron's ``qk_layernorm`` normalises each attention head on its own: one RMS statistic per
(token, head) over ``head_dim`` features, and one ``[head_dim]`` weight shared by every head.
OLMoE's ``q_norm`` / ``k_norm`` instead normalise the whole projection: one RMS statistic per
token over ``num_heads * head_dim`` (q) or ``num_query_groups * head_dim`` (k) features, with a
weight of that width. The two differ whenever heads have different scales, so a per-head norm
cannot express OLMoE whatever its weights.

:class:`FullWidthQNorm` / :class:`FullWidthKNorm` are built by megatron's ``SelfAttention``
exactly like its own q/k norms (``build_module(spec, hidden_size=head_dim, config=config,
eps=layernorm_epsilon)``) and are applied to ``query [sq, b, np, hn]`` and ``key [sq, b, ng, hn]``
(``[t, np, hn]`` with packed sequences). :func:`install_full_width_qk_norm` puts them into a
decoder layer spec (local or transformer-engine); ``vp2o.mcore.model`` does so when
``model.qk_layernorm_scope == "full"``.

Head order: megatron's ``query`` lists heads group-major (the H/G heads of group 0, then group
1, ...), which is HF's q_proj head order (``repeat_kv``: head i belongs to group i // (H/G)), so
flattening ``[np, hn]`` gives HF's feature order and the HF weight is copied as is.

Tensor parallelism is refused (``ConfigError`` from ``Config.validate``; ``ValueError`` here for
a megatron config built elsewhere): a rank holds only ``np / TP`` heads, and the statistic would
need an all-reduce of the sum of squares over the TP group plus a TP-split weight. megatron's
local norms refuse sequence parallelism, which MoE needs with TP > 1, so that path could not be
tested on CPU.
"""

from __future__ import annotations

import torch


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over the last two dimensions ``[heads, head_dim]`` taken together.

    ``y = x / sqrt(mean(x^2 over heads*head_dim) + eps) * weight``, computed in fp32 and cast back
    to the input dtype before the weight, in the order HF's ``OlmoeRMSNorm`` uses (so fp32
    forwards agree to rounding).

    Args:
        heads: heads this module normalises together (the rank's heads).
        head_dim: features per head.
        eps: added to the mean square.
        dtype: parameter dtype.
    """

    def __init__(self, heads: int, head_dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        # A real Parameter named `weight`: megatron's default sharded_state_dict (replicated at
        # TP = 1) and the converter's `{q,k}_layernorm.weight` names then work unchanged.
        self.weight = torch.nn.Parameter(torch.ones(heads * head_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., heads, head_dim]`` -> same shape and dtype."""
        if tuple(x.shape[-2:]) != (self.heads, self.head_dim):
            raise ValueError(
                f"full-width q/k norm built for [{self.heads}, {self.head_dim}] heads, "
                f"got input {list(x.shape)}"
            )
        flat = x.reshape(*x.shape[:-2], self.heads * self.head_dim).float()  # [..., heads hn]
        # One statistic per token across all heads (the point of the full-width norm).
        normed = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + self.eps)
        out = normed.to(x.dtype) * self.weight  # [..., heads hn]
        return out.to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:  # noqa: D102
        return f"heads={self.heads}, head_dim={self.head_dim}, eps={self.eps}"


def _dtype(config) -> torch.dtype | None:
    return getattr(config, "params_dtype", None)


def _check_config(config, hidden_size: int) -> None:
    tp = getattr(config, "tensor_model_parallel_size", 1) or 1
    if tp != 1:
        raise ValueError(
            f"full-width q/k norm (model.qk_layernorm_scope=full) needs tensor_model_parallel_size"
            f" = 1, got {tp}: a rank would hold only part of the heads the statistic spans"
        )
    if hidden_size != config.kv_channels:  # megatron passes the head dimension
        raise ValueError(
            f"full-width q/k norm: built with hidden_size={hidden_size}, "
            f"expected the head dimension kv_channels={config.kv_channels}"
        )


class FullWidthQNorm(FullWidthRMSNorm):
    """``q_layernorm`` over all ``num_attention_heads`` query heads (weight ``[H * hn]``).

    Signature of megatron's norm modules: ``hidden_size`` is the head dimension.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        _check_config(config, hidden_size)
        super().__init__(config.num_attention_heads, hidden_size, eps, _dtype(config))


class FullWidthKNorm(FullWidthRMSNorm):
    """``k_layernorm`` over all ``num_query_groups`` key heads (weight ``[G * hn]``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        _check_config(config, hidden_size)
        groups = config.num_query_groups or config.num_attention_heads
        super().__init__(groups, hidden_size, eps, _dtype(config))


def install_full_width_qk_norm(layer_spec):
    """Point a decoder layer spec's ``q_layernorm`` / ``k_layernorm`` at the full-width norms.

    Edits ``layer_spec`` in place (pass a copy: megatron's spec helpers share objects) and
    returns it.

    Raises:
        ValueError: the layer's attention is not megatron's ``SelfAttention`` spec (e.g. MLA).
    """
    from megatron.core.transformer.attention import SelfAttentionSubmodules

    attn = getattr(layer_spec.submodules, "self_attention", None)
    subs = getattr(attn, "submodules", None)
    if not isinstance(subs, SelfAttentionSubmodules):
        raise ValueError(
            f"full-width q/k norm needs a SelfAttention layer spec, got {type(subs).__name__}"
        )
    subs.q_layernorm = FullWidthQNorm
    subs.k_layernorm = FullWidthKNorm
    return layer_spec
