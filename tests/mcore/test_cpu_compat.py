"""vp2o.mcore.cpu: the CPU RNG tracker, the scoped CUDA-as-CPU mode, and pinned megatron names."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from vp2o.mcore import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compatibility layer only")


def test_rng_fork_is_reproducible_and_leaves_global_stream(init_parallel):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    init_parallel(seed=77)
    tracker = get_cuda_rng_tracker()
    x = torch.ones(1000)

    torch.manual_seed(5)
    reference_stream = torch.rand(8)  # what the global RNG yields with no fork in between

    torch.manual_seed(5)
    states = {k: v.clone() for k, v in tracker.get_states().items()}
    with tracker.fork():
        first = torch.nn.functional.dropout(x, p=0.5, training=True)
    after_fork = torch.rand(8)
    torch.testing.assert_close(after_fork, reference_stream, rtol=0, atol=0)

    # Same tracker state -> same dropout mask; the next fork continues the tracked stream.
    tracker.set_states({k: v.clone() for k, v in states.items()})
    with tracker.fork():
        again = torch.nn.functional.dropout(x, p=0.5, training=True)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with tracker.fork():
        second = torch.nn.functional.dropout(x, p=0.5, training=True)
    assert not torch.equal(second, first)

    # The model-parallel stream differs from the data-parallel (global) one.
    torch.manual_seed(77)
    plain = torch.nn.functional.dropout(x, p=0.5, training=True)
    assert not torch.equal(plain, first)


def test_rng_fork_nested_states_are_separate(init_parallel):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel.random import get_expert_parallel_rng_tracker_name

    init_parallel(seed=3)
    tracker = get_cuda_rng_tracker()
    with tracker.fork():
        a = torch.rand(4)
        with tracker.fork(get_expert_parallel_rng_tracker_name()):
            b = torch.rand(4)
        a2 = torch.rand(4)
    assert not torch.equal(a, b)
    # The outer stream resumed where it was: a, a2 are consecutive draws of the same generator.
    gen = torch.Generator().manual_seed(
        3 + 2718
    )  # megatron's model-parallel seed offset, TP rank 0
    torch.testing.assert_close(torch.cat([a, a2]), torch.rand(8, generator=gen), rtol=0, atol=0)


def test_cuda_as_cpu_mode_maps_devices_and_type_names():
    with cpu.cuda_as_cpu():
        z = torch.zeros(3, device="cuda")
        t = torch.tensor([1.0], device=torch.device("cuda"))
        assert z.device.type == "cpu" and t.device.type == "cpu"
        assert z.type() == "torch.cuda.FloatTensor"
        assert z.to("cuda").device.type == "cpu"
    # Outside the scope nothing is rewritten.
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_nested_scoped_functions_run_under_one_mode():
    from torch.overrides import _get_current_function_mode_stack

    def modes() -> int:
        return sum(isinstance(m, cpu.CudaAsCpu) for m in _get_current_function_mode_stack())

    seen = []

    @cpu._scoped
    def inner():
        seen.append(modes())
        return torch.zeros(2, device="cuda")

    @cpu._scoped
    def outer():
        seen.append(modes())
        return inner()

    assert outer().device.type == "cpu" and inner().device.type == "cpu"
    assert seen == [1, 1, 1]  # outer, inner inside outer (no second mode), inner alone
    assert modes() == 0


def test_scoped_entry_points_and_hooks_exist():
    """Pins the megatron-core 0.16.1 names cpu.py patches: an upgrade that moves one fails here."""
    cpu.install()
    for module_name, qualname in cpu._SCOPED:
        owner, attr, fn = cpu._resolve(module_name, qualname)
        assert getattr(fn, "__vp2o_scoped__", False), f"{module_name}.{qualname} not scoped"
    for module_name in cpu._MODULE_TORCH_PROXIES:
        assert isinstance(importlib.import_module(module_name).torch, cpu._TorchWithCpuFactories)
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    params = inspect.signature(moe_utils.maybe_move_tensor_to_cpu).parameters
    assert list(params) == ["tensor", "as_numpy", "record_stream"]
    splits = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert splits.tolist() == [1, 2] and not torch.is_tensor(splits)
    assert torch.cuda.current_device() == torch.device("cpu")
    assert cpu.install() is True  # idempotent


def test_activation_recompute_replays_dropout_exactly(init_parallel):
    """Recompute restores the RNG states, so dropout masks (and gradients) match no-recompute."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from vp2o.config import load_config
    from vp2o.mcore import model as mdl

    base = ["model.hidden_dropout=0.2", "model.attention_dropout=0.2", "model.num_layers=2"]
    cfg = load_config(None, base)
    init_parallel(cfg)
    plain = mdl.build_model(cfg)
    recomputed = mdl.build_model(load_config(None, [*base, "model.recompute=full"]))
    recomputed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10).unsqueeze(0).expand(2, -1)
    tracker_states = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    grads = []
    for model in (plain, recomputed):
        torch.manual_seed(9)
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in tracker_states.items()})
        model.train()
        model(tokens, pos, None, labels=tokens).float().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    # Dropout is really on: another seed gives other gradients.
    torch.manual_seed(10)
    plain.zero_grad()
    plain(tokens, pos, None, labels=tokens).float().mean().backward()
    name = next(iter(grads[0]))
    assert not torch.allclose(dict(plain.named_parameters())[name].grad, grads[0][name])


def test_megatron_names_we_rely_on_are_pinned():
    """megatron-core 0.16.1 internals vp2o overrides or calls: an upgrade that moves one fails
    here, with the name, instead of deep inside a run."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import MegatronOptimizer
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    # Overridden by VP2ORouter / VP2OMoELayer.
    assert list(inspect.signature(TopKRouter.routing).parameters) == [
        "self", "logits", "padding_mask"]
    assert list(inspect.signature(MoELayer.postprocess).parameters) == [
        "self", "output", "shared_expert_output"]
    assert hasattr(TopKRouter, "attach_and_log_load_balancing_loss")
    # Rollout (KV-cache decoding) and the learner's log-probs.
    for name in ("enable_decode_mode", "increment_sequence_len_offset"):
        assert hasattr(StaticInferenceContext, name), name
    forward = inspect.signature(GPTModel.forward).parameters
    for name in ("runtime_gather_output", "padding_mask", "inference_context", "labels"):
        assert name in forward, name
    # Checkpoint load workarounds (vp2o/mcore/checkpoint.py).
    for name in ("_set_main_param_and_optimizer_states", "_get_main_param_and_optimizer_states",
                 "load_parameter_state_from_fully_reshardable"):
        assert hasattr(DistributedOptimizer, name), name
    assert hasattr(MegatronOptimizer, "init_state_fn") or "init_state_fn" in inspect.signature(
        MegatronOptimizer.__init__).parameters


def test_collectives_over_one_rank_are_skipped_with_the_collectives_result(init_parallel):
    """megatron's DDP buffers call these over the data-parallel group even with one rank; the
    skip (no gloo transport) must leave what gloo's collective leaves: checked against gloo on
    a one-rank group, aliased (megatron's case: a shard view of the buffer) and not."""
    import torch.distributed as dist

    buffers = importlib.import_module("megatron.core.distributed.param_and_grad_buffer")
    init_parallel()
    group = dist.new_group([0], backend="gloo")
    gather, scatter = buffers.dist_all_gather_func, buffers.dist_reduce_scatter_func
    assert gather.__vp2o_single_rank__ and scatter.__vp2o_single_rank__
    assert buffers._coalescing_manager.__vp2o_single_rank__
    real = {gather: gather.__wrapped__, scatter: scatter.__wrapped__}
    for fn in (gather, scatter):
        kw = {} if fn is gather else {"op": dist.ReduceOp.SUM}
        src = torch.randn(6)
        want, got = torch.empty(6), torch.full((6,), float("nan"))
        real[fn](want, src, group=group, **kw)
        with buffers._coalescing_manager(group, async_ops=True) as cm:
            assert fn(got, src, group=group, async_op=True, **kw) is not None
        cm.wait()
        assert torch.equal(got, want) and torch.equal(want, src)
        alias = src.clone()
        assert fn(alias, alias.view(6), group=group, **kw) is None
        assert torch.equal(alias, src)
    # The real collectives still run over more than one rank (tests/mcore/test_distributed.py
    # and the other multi-process tests compare DP = 2 runs with one process).
    assert gather.__wrapped__ is dist.all_gather_into_tensor


_DEFERRED_COMPILE_PROBE = r"""
import sys
import torch
import vp2o  # installs the hook that runs before megatron's first import
import megatron.core  # noqa: F401
from megatron.core import jit
from vp2o.mcore import cpu

assert "torch._dynamo" not in sys.modules, "megatron's import loaded dynamo"
calls = []
cpu._REAL_COMPILE = lambda fn: calls.append(fn) or (lambda *a: fn(*a) + 100)
def f(x):
    return x * 2 + 1
g = jit.jit_fuser(f)
assert calls == [] and g.__name__ == "f"
assert g(torch.ones(2)).tolist() == [103.0, 103.0] and calls == [f]
g(torch.ones(1))
assert calls == [f]  # compiled once
print("deferred")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the deferral is CPU-only")
def test_megatron_import_defers_its_compile_decorations_to_the_first_call():
    """Importing megatron-core after vp2o loads neither dynamo nor inductor, and a function
    megatron decorated with ``torch.compile`` (its ``jit_fuser``) goes through the real
    ``torch.compile`` on its first call, once (a stand-in records the call)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _DEFERRED_COMPILE_PROBE], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "deferred" in proc.stdout, proc.stderr[-3000:]
