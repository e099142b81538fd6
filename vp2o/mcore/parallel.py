"""torch.distributed and megatron ``parallel_state`` set-up and teardown.

The only module of vp2o that reads megatron's ``parallel_state``; everything else receives process
groups as arguments (see :class:`ParallelGroups`).

Rank discovery, in order: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``),
SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, master from ``MASTER_ADDR`` or the
first host of ``SLURM_JOB_NODELIST``), else a single process on loopback.
"""

from __future__ import annotations

import datetime
import gc
import os
import random
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vp2o.config import Config, ParallelConfig
from vp2o.mcore import cpu


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def free_port() -> int:
    """A loopback TCP port nothing is bound to, picked *below* the kernel's ephemeral range.

    Client sockets (every TCPStore connection, HTTP, ...) take their ports from the ephemeral
    range, so a port found free there can be taken before the rendezvous binds it (seen as
    EADDRINUSE under load). Ports below that range are only handed out by explicit binds.
    """
    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(15000, max(low, 15001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # everything below the range is taken: any free port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return out.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # Plain "host1,host2" or a single host: take the first name.
        return nodelist.split(",")[0]


def discover_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read rank, world size and rendezvous address from torchrun or SLURM variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(
            env.get("SLURM_JOB_NODELIST", "localhost")
        )
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=addr,
            master_port=port,
        )
    port = env.get("MASTER_PORT")
    return DistEnv(0, 1, 0, "127.0.0.1", int(port) if port else free_port())


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups vp2o passes explicitly to its megatron integration.

    Attributes:
        dp_cp: data x context parallel (dense gradient reduction).
        tp_dp_cp: tensor x data x context parallel: the ranks that hold different tokens of one
            MoE layer; co-activation statistics are summed over it (method §3).
        ep: expert-parallel group (prototype all-gather, attraction reduce-scatter, method §4, §6).
        etp: expert tensor-parallel group (power-iteration products, method §4).
        expert_dp: expert data-parallel group (expert gradient reduction).
    """

    dp_cp: dist.ProcessGroup
    tp_dp_cp: dist.ProcessGroup
    ep: dist.ProcessGroup
    etp: dist.ProcessGroup
    expert_dp: dist.ProcessGroup
    tp_rank: int
    ep_rank: int
    dp_rank: int
    pp_rank: int


def initialize(cfg: Config, *, seed: int | None = None) -> ParallelGroups:
    """Start torch.distributed and megatron's model-parallel groups for ``cfg.parallel``.

    Validates the layout against the world size first, so a bad layout fails before any
    collective. Installs the CPU compatibility layer when CUDA is absent. Idempotent for the
    same layout in one process.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    cpu.install()
    env = discover_env()
    cfg.parallel.check_world(env.world_size)  # the rest was checked when the config loaded
    p: ParallelConfig = cfg.parallel
    backend = p.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        chose_port = "MASTER_PORT" not in os.environ and env.world_size == 1
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT", str(env.master_port))
        for attempt in range(5):
            try:
                dist.init_process_group(
                    backend=backend,
                    rank=env.rank,
                    world_size=env.world_size,
                    timeout=datetime.timedelta(minutes=p.timeout_minutes),
                )
                break
            except dist.DistNetworkError:
                # A port we picked ourselves (single process) was taken meanwhile: pick again.
                if not chose_port or attempt == 4:
                    raise
                os.environ["MASTER_PORT"] = str(free_port())
        if chose_port:
            del os.environ["MASTER_PORT"]  # the next job in this process picks its own
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_parallel,
            pipeline_model_parallel_size=p.pipeline_parallel,
            context_parallel_size=p.context_parallel,
            expert_model_parallel_size=p.expert_parallel,
            expert_tensor_parallel_size=p.etp,
            distributed_timeout_minutes=p.timeout_minutes,
            create_gloo_process_groups=True,  # megatron's optimizers expect them
        )
    tensor_parallel.model_parallel_cuda_manual_seed(
        cfg.seed if seed is None else seed, force_reset_rng=True
    )
    return groups()


def groups() -> ParallelGroups:
    """The current process groups (after :func:`initialize`)."""
    from megatron.core import parallel_state as ps

    return ParallelGroups(
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        tp_dp_cp=ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
        ep=ps.get_expert_model_parallel_group(),
        etp=ps.get_expert_tensor_parallel_group(),
        expert_dp=ps.get_expert_data_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
    )


def destroy() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice).

    Also drops the references megatron keeps after its own teardown (:func:`_drop_stale_groups`)
    and collects garbage: a process group lives as long as anything references it, models hold
    theirs in reference cycles (megatron DDP's hooks), and each gloo group holds a polling thread
    and two work threads (plus the store's thread for the default group) until it is freed.
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _drop_stale_groups()
    gc.collect()


def _drop_stale_groups() -> None:
    """Forget the process groups megatron-core 0.16 still references after
    ``destroy_model_parallel``:

    - ``parallel_state`` globals that teardown does not reset
      (``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP`` and its gloo twin in 0.16.1): every module
      global still holding a group, or a list/tuple of them, is set to None, whatever its name;
    - the ``lru_cache`` on the rotary embeddings' ``forward``: a class-level cache keyed on the
      module, so it keeps up to 32 rotary modules of released models alive, each with its
      context-parallel group (``cp_group``). Clearing it costs a live model one recomputation.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rope
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as yarn

    def holds_group(value: object) -> bool:
        if isinstance(value, list | tuple):
            return any(isinstance(v, dist.ProcessGroup) for v in value)
        return isinstance(value, dist.ProcessGroup)

    for name, value in list(vars(ps).items()):
        if name.startswith("_") and holds_group(value):
            setattr(ps, name, None)
    for cls in (rope.RotaryEmbedding, yarn.YarnRotaryEmbedding):
        cache_clear = getattr(cls.forward, "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def gather_over_data_ranks(row: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """[R, *row.shape]: every data-parallel rank's ``row`` (the same shape on each: sums, counts,
    a few statistics) in rank order, on the CPU; [1, ...] without data parallelism. One
    all-gather (through the GPU where the backend is nccl)."""
    group = groups.dp_cp
    size = dist.get_world_size(group)
    if size == 1:
        return row.unsqueeze(0).cpu()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")  # nccl gathers CUDA tensors only
    row = row.to(device)
    parts = [torch.empty_like(row) for _ in range(size)]
    dist.all_gather(parts, row, group=group)
    return torch.stack(parts).cpu()


REDUCTIONS = ("sum", "max", "min", "token_mean", "loss_share")
"""How a per-micro-batch statistic combines over the micro-batches and data-parallel ranks:
``sum``, ``max``, ``min`` of every micro-batch's value; ``token_mean``, the mean weighted by each
micro-batch's response tokens (``_tokens``: a mean over every response token of the global
batch, whatever the layout); ``loss_share``, summed over a rank's micro-batches and averaged
over the ranks (each micro-batch's value is its share of its rank's loss, whose normaliser is
the global batch's divided by the number of ranks, ``vp2o.learner.loss_normaliser``)."""


def reduce_stats(per_micro: list[dict], reductions: dict[str, str],
                 groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The global batch's value of every statistic in ``per_micro`` (one dict per micro-batch of
    this rank; keys starting with ``_`` are not statistics), reduced as ``reductions`` declares
    for its key, with one all-gather over the data-parallel ranks and one transfer to the host.
    The keys must be the same on every rank (they follow from the config).

    Raises:
        KeyError: a statistic without a declared reduction (it would never be logged).
    """
    keys = [k for k in per_micro[0] if not k.startswith("_")]
    undeclared = [k for k in keys if reductions.get(k) not in REDUCTIONS]
    if undeclared:
        raise KeyError(f"statistics without a reduction in {REDUCTIONS}: {undeclared}")
    tokens = torch.stack([o["_tokens"] for o in per_micro]).double()  # [M]
    row = []  # per key: (numerator, denominator) of this rank
    for k in keys:
        v = torch.stack([o[k] for o in per_micro]).double()  # [M]
        how = reductions[k]
        one = v.new_ones(())
        if how == "token_mean":
            row += [(v * tokens).sum(), tokens.sum()]
        elif how in ("sum", "loss_share"):
            row += [v.sum(), one]
        else:
            row += [v.amax() if how == "max" else v.amin(), one]
    ranks = gather_over_data_ranks(torch.stack(row), groups).view(-1, len(keys), 2)  # [R, K, 2]
    out = {}
    for i, k in enumerate(keys):
        num, den, how = ranks[:, i, 0], ranks[:, i, 1], reductions[k]
        if how == "token_mean":
            value = num.sum() / den.sum().clamp_min(1)
        elif how == "sum":
            value = num.sum()
        elif how == "loss_share":
            value = num.mean()
        else:
            value = num.amax() if how == "max" else num.amin()
        out[k] = value.float()
    return out
