"""All local experts of a MoE layer in one grouped GEMM per projection, for the local spec.

:class:`GroupedExperts` replaces megatron's ``SequentialMLP`` (one GEMM per expert from a Python
loop) when ``model.moe_grouped_gemm = true`` builds the local spec (no transformer-engine):
``torch._grouped_mm`` multiplies each expert's block of dispatched rows by that expert's weights
in one call, forward and backward, on the CPU and on CUDA.

Weights: ``weight1`` [E_loc, 2f, d] (SwiGLU: gate rows, then up rows; f rows without a GLU) and
``weight2`` [E_loc, d, f], so ``weight1[i]`` and ``weight2[i]`` are expert i's
``linear_fc1.weight`` and ``linear_fc2.weight`` of ``SequentialMLP``, same shapes and layout.
The math is ``SequentialMLP``'s: fc1, the activation (GLU: ``act(gate) * up``), times the token's
gate (``permuted_probs``) cast back to the activation dtype, fc2.

Checkpoints: :meth:`GroupedExperts.sharded_state_dict` presents each weight as one fragment of
the global [E, out, in] tensor under ``SequentialMLP``'s key (``{prefix}experts.linear_fc1.weight``
and ``...linear_fc2.weight``: megatron stores a sequential layer's experts as the fragments of that
global tensor), so a checkpoint written by either module loads into the other under any expert
parallelism (megatron's dist_checkpointing reads whichever fragments overlap).

Supported: expert tensor parallelism 1, no expert biases, megatron's default GLU (no clamp, no
linear offset), no FP8/FP4; anything else is refused at build time naming the setting.
``vp2o.mcore.expert_layout`` gives the Stein transform per-expert views of these weights and of
their ``main_grad``.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_gpu
from megatron.core.transformer.module import MegatronModule

GROUPED_MM_ALIGN_BYTES = 16
"""torch._grouped_mm needs every row stride to be a multiple of 16 bytes (CPU and CUDA)."""


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s CPU backward refuses a stride-0 upstream gradient (what ``.sum()``
    sends back) and any row stride that is not a multiple of 16 bytes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[i-1]:offs[i]`` of ``x`` [T, in] times ``weight[i].T`` (weight [E, out, in])."""
    y = torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)
    return _ContiguousGrad.apply(y) if y.requires_grad else y


def check_grouped_experts(config) -> None:
    """Refuse megatron settings :class:`GroupedExperts` does not implement (by config name)."""
    problems = []
    if config.expert_tensor_parallel_size not in (None, 1):
        problems.append(f"parallel.expert_tensor_parallel = {config.expert_tensor_parallel_size}"
                        " (expected 1)")
    if config.add_bias_linear:
        problems.append("model.add_bias_linear = true (expert biases)")
    if getattr(config, "activation_func_clamp_value", None) is not None:
        problems.append("activation_func_clamp_value set")
    if getattr(config, "glu_linear_offset", 0.0):
        problems.append("glu_linear_offset set")
    if config.fp8 or getattr(config, "fp4", None):
        problems.append("fp8/fp4 experts")
    elem = torch.empty((), dtype=config.params_dtype).element_size()
    for name, size in (("model.hidden_size", config.hidden_size),
                       ("model.moe_ffn_hidden_size", config.moe_ffn_hidden_size)):
        if size * elem % GROUPED_MM_ALIGN_BYTES:
            problems.append(f"{name} = {size} (torch._grouped_mm needs a multiple of "
                            f"{GROUPED_MM_ALIGN_BYTES // elem} for {config.params_dtype})")
    if problems:
        raise ValueError(
            "model.moe_grouped_gemm = true on the local spec (vp2o GroupedExperts) does not "
            "support: " + "; ".join(problems) + " (set model.moe_grouped_gemm = false)"
        )


class GroupedExperts(MegatronModule):
    """The local experts of one MoE layer as two [E_loc, out, in] weights and grouped GEMMs.

    Built by megatron's ``MoELayer`` from the spec (``build_module(experts_spec, num_local_experts,
    config, pg_collection=...)``): the signature of ``SequentialMLP``.
    """

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None):
        super().__init__(config=config)
        check_grouped_experts(config)
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.dp_group = pg_collection.expt_dp
        d, f = config.hidden_size, config.moe_ffn_hidden_size
        out1 = 2 * f if config.gated_linear_unit else f
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        kw = dict(dtype=config.params_dtype, device=device)
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, out1, d, **kw))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, d, f, **kw))
        if config.perform_initialization:  # megatron's expert RNG stream, as its linears use
            _initialize_affine_weight_gpu(self.weight1, config.init_method, 1, is_expert=True)
            _initialize_affine_weight_gpu(
                self.weight2, config.output_layer_init_method, 2, is_expert=True
            )
        else:
            for w, dim in ((self.weight1, 1), (self.weight2, 2)):
                w.tensor_model_parallel, w.partition_dim, w.partition_stride = True, dim, 1
        for w in (self.weight1, self.weight2):
            w.allreduce = False  # expert parameter: reduced over the expert-data-parallel group

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:
        """[T, d] rows grouped by local expert -> ([T, d] gate-weighted outputs, no bias)."""
        x, probs = permuted_local_hidden_states, permuted_probs
        cfg = self.config
        if cfg.moe_apply_probs_on_input:  # megatron's option: gate the input instead (top-1)
            if cfg.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input needs moe_router_topk = 1")
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        counts = torch.as_tensor(tokens_per_expert).to(device=x.device)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E_loc] block ends
        h = grouped_linear(x, self.weight1, offs)  # [T, 2f] or [T, f]
        if cfg.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            h = cfg.activation_func(gate) * up
        else:
            h = cfg.activation_func(h)
        h = (h * probs.unsqueeze(-1)).to(x.dtype)
        return grouped_linear(h, self.weight2, offs), None

    def backward_dw(self) -> None:
        """Nothing deferred (megatron calls this with delayed weight-gradient computation)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Each weight as this rank's fragment [E_loc, out, in] of the global [E, out, in]
        tensor under ``SequentialMLP``'s key (see the module docstring)."""
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

        if (metadata or {}).get("singleton_local_shards", False):
            raise NotImplementedError(
                "GroupedExperts checkpoints use megatron's default expert layout "
                "(singleton_local_shards = false)"
            )
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        axis = len(sharded_offsets)
        out = {}
        for name, local_name in (("linear_fc1.weight", "weight1"),
                                 ("linear_fc2.weight", "weight2")):
            out[f"{prefix}{local_name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}experts.{name}",
                getattr(self, local_name),
                *sharded_offsets,
                (axis, ep_rank, ep_size),
                replica_id=(0, 0, self.dp_group.rank()),
                prepend_axis_num=len(sharded_offsets),
            )
        # SequentialMLP's linears also save an (empty) extra state per expert: written too, so
        # that a SequentialMLP finds them in this module's checkpoints. Local key: our own
        # (empty) extra state, which takes the loaded list and ignores it.
        first = ep_rank * self.num_local_experts
        out[f"{prefix}_extra_state"] = [
            make_sharded_object_for_checkpoint(
                None,
                f"{prefix}experts.{linear}._extra_state",
                (*sharded_offsets, (axis, first + i, ep_size * self.num_local_experts)),
                replica_id=(0, 0, self.dp_group.rank()),
            )
            for i in range(self.num_local_experts)
            for linear in ("linear_fc1", "linear_fc2")
        ]
        return out

    def get_extra_state(self) -> None:
        """No extra state (the key exists for :meth:`sharded_state_dict`'s objects)."""
        return None

    def set_extra_state(self, state) -> None:
        """Accept and drop the loaded (empty) per-expert extra states."""
