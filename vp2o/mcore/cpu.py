"""CPU compatibility for megatron-core 0.16.1 (a no-op when CUDA is available).

megatron-core assumes a CUDA device in a handful of places on the paths vp2o uses. On a machine
without CUDA, :func:`install` patches exactly those, so that tests and the laptop demo run the
real megatron-core MoE layers, its DistributedDataParallel and its DistributedOptimizer over gloo.

Five mechanisms, chosen for cost:

1. Global function patches, for things a CPU-only torch cannot do at all (each would raise):
   ``torch.cuda.current_device``, streams and events, ``synchronize``, ``Tensor.cuda``, the CUDA
   RNG tracker and state getters/setters, ``maybe_move_tensor_to_cpu`` and the missing
   ``te_general_gemm`` name. They cost nothing on the hot path.
2. A :class:`CudaAsCpu` ``TorchFunctionMode`` that rewrites ``device='cuda'`` to the CPU and
   answers ``Tensor.type()`` with the CUDA type name (megatron's optimizers check
   ``param.type() == 'torch.cuda.FloatTensor'``). A torch-function mode adds about 1 us to every
   op, so it is *not* active globally: it wraps only the megatron-core entry points listed in
   ``_SCOPED`` (construction, optimizer step, checkpointing, the aux-loss tracker), none of which
   is a per-token hot path. Forward and backward run without it at full speed.
3. Module-local torch proxies for the two modules whose literal ``device="cuda"`` factories sit
   on the forward path (``pipeline_parallel.schedules``, ``get_default_causal_mask``'s module):
   only that module's global ``torch`` is replaced, by a delegate that maps the device.
4. Collectives over one rank skipped (:func:`_skip_single_rank_collectives`): megatron's DDP
   buffers reduce-scatter their gradients and all-gather their parameters over the data-parallel
   group even when it has one rank (DP = 1, the expert-data-parallel group at EP = world), where
   both are identities. NCCL does that at memory speed on the device; gloo copies every buffer
   through its transport (at bench_learner's 425 M-parameter shape ~2-5 s of a ~12 s step). Not a
   CUDA hard-code, but gloo is the CPU's backend, so it lives here.

5. ``torch.compile`` decorations deferred to the first call
   (:func:`defer_compile_decorations`, run by ``vp2o/__init__.py`` just before megatron-core is
   first imported): megatron decorates 38 fusion functions with ``torch.compile`` at import,
   and each decoration loads dynamo and inductor (``import vp2o.train`` 4.4 s -> 2.6 s without)
   although the model config vp2o builds turns those fusions off. A deferred function compiles
   on its first call, as ``torch.compile``'s own wrapper does.

Every patch names the megatron-core function it covers. ``tests/mcore/test_cpu_compat.py`` pins
them, so a megatron-core upgrade that moves one fails loudly instead of silently.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

logger = logging.getLogger(__name__)

_INSTALLED = False  # set once per process by install(); patches are process-wide by nature

# Entry points of megatron-core that build tensors with a literal device='cuda', call `.cuda()`,
# or compare `param.type()` against 'torch.cuda.*'. Each runs inside CudaAsCpu.
_SCOPED: tuple[tuple[str, str], ...] = (
    # ParamAndGradBuffer.__init__: torch.zeros([1], device="cuda") warm-up, grad_data allocation.
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__"),
    # DistributedDataParallel.__init__: buffers and streams on torch.cuda.current_device().
    ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel.__init__"),
    # MixedPrecisionOptimizer/FP32Optimizer.__init__: found_inf, _scale_one, _scale on 'cuda'.
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__"),
    # Float16OptimizerWithFloat16Params.__init__: param.type() == 'torch.cuda.*Tensor' checks.
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    # DistributedOptimizer.__init__ / _build_model_and_main_param_groups: param.type() checks.
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    # ConstantGradScaler/DynamicGradScaler.__init__: scale tensors on 'cuda'.
    ("megatron.core.optimizer.grad_scaler", "MegatronGradScaler.__init__"),
    ("megatron.core.optimizer.grad_scaler", "DynamicGradScaler.__init__"),
    # clip_grad_by_total_norm_fp32: asserts grad.type() == 'torch.cuda.FloatTensor';
    # get_grad_norm_fp32 / count_zeros_fp32: torch.tensor(..., device='cuda').
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "count_zeros_fp32"),
    # Optimizer steps call clip_grads through module-level names bound at import, so the step
    # itself is scoped as well (elementwise work over parameters, not per token).
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.step"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.step"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer.step"),
    # Checkpoint load of optimizer state moves tensors with .cuda() (optimizer.py:375-380,
    # distrib_optimizer.py:1089).
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer.load_state_dict"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.load_state_dict"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.sharded_state_dict"),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.load_parameter_state_from_dp_reshardable",
    ),
    # save_to_aux_losses_tracker: torch.zeros(num_layers, device="cuda") on first use of a key.
    ("megatron.core.transformer.moe.moe_utils", "save_to_aux_losses_tracker"),
    # dist_checkpointing save/load: synchronize() and device='cuda' staging.
    ("megatron.core.dist_checkpointing.serialization", "save"),
    ("megatron.core.dist_checkpointing.serialization", "load"),
)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaAsCpu(TorchFunctionMode):
    """Run megatron-core code written for CUDA on the CPU.

    - ``device='cuda'`` (or ``torch.device('cuda')``) in any call becomes ``'cpu'``;
    - ``Tensor.to('cuda')`` / ``Tensor.cuda()`` return the CPU tensor;
    - ``Tensor.type()`` with no argument returns ``'torch.cuda.FloatTensor'``-style names, which
      is what megatron's optimizers compare against to tell fp32 from 16-bit parameters.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_as_cpu() -> Iterator[None]:
    """Context in which megatron-core's CUDA-only tensor creation runs on the CPU.

    A no-op when CUDA is available. Re-entrant.
    """
    if torch.cuda.is_available():
        yield
        return
    with CudaAsCpu():
        yield


def _inside_cuda_as_cpu() -> bool:
    """Whether a :class:`CudaAsCpu` is on the active torch-function mode stack (a mode that
    torch popped while it runs a handled call does not count)."""
    return any(isinstance(mode, CudaAsCpu) for mode in _get_current_function_mode_stack())


def _scoped(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # One mode is enough: every mode on the stack adds a Python call to every torch op
        # (megatron's optimizer step nests three scoped functions: 12.4 -> 10.1 ms per step at
        # the demo shape with one).
        if _inside_cuda_as_cpu():
            return fn(*args, **kwargs)
        with CudaAsCpu():
            return fn(*args, **kwargs)

    wrapper.__vp2o_scoped__ = True  # type: ignore[attr-defined]
    return wrapper


def _resolve(module_name: str, qualname: str) -> tuple[Any, str, Any]:
    """Return (owner, attribute, function) for ``module:qualname``."""
    owner: Any = importlib.import_module(module_name)
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1], getattr(owner, parts[-1])


class _Stream:
    """Stands in for ``torch.cuda.Stream``: CPU work is ordered, so every method is trivial."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args) -> None:  # noqa: D102
        pass

    def wait_event(self, *args) -> None:  # noqa: D102
        pass

    def synchronize(self) -> None:  # noqa: D102
        pass

    def record_event(self, event=None):  # noqa: D102
        return event or _Event()

    def query(self) -> bool:  # noqa: D102
        return True


class _Event:
    """Stands in for ``torch.cuda.Event``; ``elapsed_time`` uses the host clock."""

    def __init__(self, *args, **kwargs) -> None:
        self._t = 0.0

    def record(self, *args) -> None:  # noqa: D102
        import time

        self._t = time.perf_counter()

    def synchronize(self) -> None:  # noqa: D102
        pass

    def wait(self, *args) -> None:  # noqa: D102
        pass

    def query(self) -> bool:  # noqa: D102
        return True

    def elapsed_time(self, end: _Event) -> float:  # noqa: D102
        return (end._t - self._t) * 1000.0


_CPU_STREAM = _Stream()


def _make_cpu_rng_tracker_class(base: type) -> type:
    """A CudaRNGStatesTracker whose named states are real CPU generator states.

    Covers megatron.core.tensor_parallel.random.CudaRNGStatesTracker: ``add`` seeds a fresh
    ``torch.Generator`` instead of the CUDA default generator; ``fork`` swaps the named state into
    the global CPU generator for the duration of the block and swaps the caller's state back after,
    so random ops inside a model-parallel region (dropout) draw from the tracked stream and the
    global CPU stream continues exactly where it was.
    """

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        def add(self, name, seed):  # noqa: D102
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):  # noqa: D102
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    CpuRNGStatesTracker.__qualname__ = "CpuRNGStatesTracker"
    return CpuRNGStatesTracker


def _cpu_maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Covers megatron.core.transformer.moe.moe_utils.maybe_move_tensor_to_cpu.

    Upstream converts split sizes to numpy only for CUDA tensors; on CPU they would stay tensors
    and ``all_to_all_single`` rejects tensor split sizes. Convert whenever ``as_numpy`` is set.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


class _TorchWithCpuFactories:
    """The ``torch`` module as one megatron module sees it, with ``device='cuda'`` factories on CPU.

    For modules whose literal-'cuda' tensor factories sit on a per-step path that also runs the
    forward and backward (so the torch-function mode would tax every op): only that module's
    global name ``torch`` is replaced; attribute access is delegated to the real module.
    """

    _FACTORIES = frozenset({"zeros", "ones", "empty", "full", "tensor", "arange"})

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name in self._FACTORIES:

            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if _is_cuda_device(kwargs.get("device")):
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)

            return factory
        return attr


# Modules whose global ``torch`` becomes _TorchWithCpuFactories, with the functions covered.
_MODULE_TORCH_PROXIES: tuple[str, ...] = (
    # forward_backward_no_pipelining / _pipelining_*: torch.zeros([], device="cuda") token counter.
    "megatron.core.pipeline_parallel.schedules",
    # get_default_causal_mask: torch.ones(sq, sq, device="cuda") when no attention mask is given.
    "megatron.core.transformer.utils",
)


_REAL_COMPILE: Callable | None = None  # torch.compile before defer_compile_decorations


def defer_compile_decorations() -> bool:
    """On a machine without CUDA, make ``torch.compile(fn)`` for a plain function return a
    wrapper that calls the real ``torch.compile(fn)`` on its first call (item 4 above).

    Only the bare decorator form is deferred (one function, no options: megatron's
    ``jit_fuser``); every other use goes to torch's own at once. torch's wrapper also compiles
    lazily: what changes is that dynamo and inductor are imported when something is compiled,
    not when megatron-core is imported. Process-wide and idempotent; returns True when active.
    """
    global _REAL_COMPILE
    if torch.cuda.is_available():
        return False
    if _REAL_COMPILE is None:
        _REAL_COMPILE = torch.compile

        def compile_on_first_call(model=None, **options):
            if options or not inspect.isfunction(model):
                return _REAL_COMPILE(model, **options) if model is not None else (
                    _REAL_COMPILE(**options))
            compiled = None

            @functools.wraps(model)
            def run(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = _REAL_COMPILE(model)
                return compiled(*args, **kwargs)

            return run

        torch.compile = compile_on_first_call
    return True


def install() -> bool:
    """Patch megatron-core for CPU execution. Idempotent; returns True when patches are active.

    With CUDA only the transformer-engine-absent name fix applies (see
    ``_define_names_missing_without_te``) and it returns False.
    """
    global _INSTALLED
    _define_names_missing_without_te()
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True

    # torch.cuda.current_device(): used as `device=` all over megatron-core (router, experts,
    # param_and_grad_buffer, distributed_data_parallel, distrib_optimizer, tensor_parallel
    # layers/mappings/utils, utils.py). The CPU is "the current device".
    torch.cuda.current_device = lambda: torch.device("cpu")
    # torch.cuda.Stream / Event / stream() / current_stream(): the alltoall dispatcher
    # (MoEAlltoAllTokenDispatcher.__init__), shared experts overlap, DDP communication stream,
    # and inference code build these.
    torch.cuda.Stream = _Stream
    torch.cuda.Event = _Event
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM
    torch.cuda.default_stream = lambda *a, **k: _CPU_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # torch.cuda.synchronize: DDP (allocate/free buffers), optimizer, dist_checkpointing save.
    torch.cuda.synchronize = lambda *a, **k: None
    # Tensor.cuda(): optimizer.py:375-380 and distrib_optimizer.py:1089 on checkpoint load,
    # tensor_parallel/data.py broadcast_data. On the CPU "the device" is the CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self

    # The CUDA RNG tracker (megatron.core.tensor_parallel.random.CudaRNGStatesTracker), entered
    # by every attention's dropout: real, separate CPU generator states.
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    rnd.CudaRNGStatesTracker = _make_cpu_rng_tracker_class(rnd.CudaRNGStatesTracker)
    rnd.initialize_rng_tracker(force_reset=True)
    # random._get_cuda_rng_state / _set_cuda_rng_state: activation recompute
    # (CheckpointFunction via _get_all_rng_states/_set_all_rng_states) saves the CPU state and
    # the "CUDA" state. On the CPU the device generator *is* the CPU generator, which
    # torch.get/set_rng_state already cover: the device part is empty.
    rnd._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    rnd._set_cuda_rng_state = lambda *a, **k: None

    # moe_utils.maybe_move_tensor_to_cpu, and the name token_dispatcher imported from it.
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    moe_utils.maybe_move_tensor_to_cpu = _cpu_maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = _cpu_maybe_move_tensor_to_cpu

    originals: dict[int, Callable] = {}  # id(original function) -> its scoped wrapper
    for module_name in _MODULE_TORCH_PROXIES:
        mod = importlib.import_module(module_name)
        if not isinstance(mod.torch, _TorchWithCpuFactories):
            mod.torch = _TorchWithCpuFactories(mod.torch)

    for module_name, qualname in _SCOPED:
        owner, attr, fn = _resolve(module_name, qualname)
        if not getattr(fn, "__vp2o_scoped__", False):
            originals[id(fn)] = _scoped(fn)
            setattr(owner, attr, originals[id(fn)])
    _rebind_imported_names(originals)
    _skip_single_rank_collectives()

    _INSTALLED = True
    logger.info("vp2o.mcore.cpu: megatron-core patched for CPU execution")
    return True


class _NoWork:
    """The handle of a skipped collective: nothing to wait for."""

    def wait(self, *args, **kwargs) -> None:  # noqa: D102
        return None


def _one_rank(group) -> bool:
    import torch.distributed as dist

    return dist.get_world_size(group) == 1


def _single_rank_identity(collective: Callable) -> Callable:
    """``collective(output, input, ..., group=)`` (all-gather or reduce-scatter into one
    tensor): over a group of one rank, ``output`` becomes ``input`` (no copy when they alias),
    as the collective would leave it, without gloo."""

    @functools.wraps(collective)
    def wrapper(output, input, *args, group=None, async_op=False, **kwargs):
        if not _one_rank(group):
            return collective(output, input, *args, group=group, async_op=async_op, **kwargs)
        if output.data_ptr() != input.data_ptr() or output.shape != input.shape:
            output.copy_(input.view_as(output))
        return _NoWork() if async_op else None

    wrapper.__vp2o_single_rank__ = True
    return wrapper


def _single_rank_coalescing(manager: Callable) -> Callable:
    """torch's ``_coalescing_manager``, except over a group of one rank: a handle with nothing
    to wait for (the collectives inside are the skipped ones above, or run uncoalesced)."""

    @contextlib.contextmanager
    def wrapper(group=None, device=None, async_ops: bool = False):
        if _one_rank(group):
            yield _NoWork()
            return
        with manager(group, device=device, async_ops=async_ops) as cm:
            yield cm

    wrapper.__vp2o_single_rank__ = True
    return wrapper


def _skip_single_rank_collectives() -> None:
    """Covers megatron.core.distributed.param_and_grad_buffer's module-level
    ``dist_all_gather_func`` (``_ParamAndGradBucketGroup.start_param_sync``),
    ``dist_reduce_scatter_func`` (``start_grad_sync``, distributed optimizer) and
    ``_coalescing_manager`` (both; with it skipped, ``start_grad_sync``'s all-reduce without
    the distributed optimizer runs uncoalesced, which gloo does at once over one rank)."""
    buffers = importlib.import_module("megatron.core.distributed.param_and_grad_buffer")
    for name, wrap in (("dist_all_gather_func", _single_rank_identity),
                       ("dist_reduce_scatter_func", _single_rank_identity),
                       ("_coalescing_manager", _single_rank_coalescing)):
        fn = getattr(buffers, name)
        if not getattr(fn, "__vp2o_single_rank__", False):
            setattr(buffers, name, wrap(fn))


def _define_names_missing_without_te() -> None:
    """Covers megatron.core.transformer.moe.moe_utils.RouterGatingLinearFunction.

    It tests ``te_general_gemm is not None``, but the name is only defined when
    transformer-engine imports, so without TE the router raises NameError on GPUs too. None
    selects the plain torch path. Applied whatever the device (the one patch that is not
    CPU-only).
    """
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _rebind_imported_names(originals: dict[int, Callable]) -> None:
    """Point names that other modules imported with ``from x import f`` at the scoped versions.

    ``from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32`` binds the
    original function in the importing module; it is rebound there only if it is that very
    function (identity), so nothing else of the same name is touched.
    """
    for module_name in (
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.distrib_optimizer",
        "megatron.core.optimizer",
        "megatron.core.transformer.moe.router",
        "megatron.core.transformer.moe.moe_layer",
        "megatron.core.dist_checkpointing",
    ):
        mod = importlib.import_module(module_name)
        for attr, value in list(vars(mod).items()):
            if callable(value) and id(value) in originals:
                setattr(mod, attr, originals[id(value)])
