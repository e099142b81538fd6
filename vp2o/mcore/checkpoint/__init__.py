"""Training checkpoints (model, optimizer, scheduler, RNG, trainer state), written atomically.

    path = save_checkpoint(run_dir / "checkpoints", step, model=ddp, optimizer=opt,
                           scheduler=sched, extra={"step": step, ...}, keep_last=2)
    ...
    path = latest_checkpoint(run_dir / "checkpoints")          # None: start fresh
    extra = load_checkpoint(path, model=ddp, optimizer=opt, scheduler=sched)

One concern a module:

    save_load.py        save_checkpoint, load_checkpoint (and the checks before a load)
    markers.py          complete.json, the latest checkpoint, which loop wrote it, keep_last
    errors.py           CheckpointError and the description of a cause (DCP, errno, file)
    optimizer_fixes.py  megatron-core 0.16.1 workarounds for torch's optimizers (GPU too)

One checkpoint is one directory ``root/step_{step:08d}``::

    metadata.json, common.pt, __*_*.distcp    megatron dist_checkpointing (torch_dist): the
                                              model's and the optimizer's sharded_state_dict
    trainer_state.pt                          scheduler state_dict and ``extra`` (rank 0)
    rng/rank_{rank:05d}.pt                    this rank's RNG states (torch CPU and CUDA, the
                                              megatron model-parallel tracker, python, numpy)
    complete.json                             the marker, written last (step, world size,
                                              layout, kind, time)

The directory is also a plain megatron dist checkpoint: ``dist_checkpointing.load({"model":
model.sharded_state_dict()}, path)`` (``vp2o.convert.load_model_weights``) reads the weights.

**Atomicity.** Everything is written into ``root/.tmp_step_{step:08d}``; after every rank has
finished (barrier), rank 0 writes ``complete.json`` (via a temporary file, fsynced) and renames the
directory to ``step_{step:08d}``. :func:`latest_checkpoint` only takes directories named
``step_NNNNNNNN`` whose marker parses and names that step, so a process killed at any point leaves
the previous checkpoints as they were and never a directory that would be taken for a checkpoint.
Pruning (``keep_last``) renames a directory to ``.del_step_...`` before deleting it. Leftover
``.tmp_*``/``.del_*``/``.old_*`` directories are removed by the next save.

**Failures.** Every rank's outcome of every phase is exchanged (``all_gather_object``), so a
failure on one rank (disk full, unwritable directory) raises :class:`CheckpointError` on all ranks
instead of leaving the others waiting in a barrier; the error names the path and the cause. The
temporary directory is removed; existing checkpoints are not touched.

**Resharding.** Optimizer state uses megatron's ``fully_reshardable`` format of the distributed
optimizer (``chained_optim_avoid_prefix``: no per-sub-optimizer prefixes), so a checkpoint saved
under one TP/EP/DP layout loads under another, with or without the distributed optimizer, given
the same optimizer nesting (``build_model`` marks experts ``allreduce=False`` at every EP size).

**RNG.** Restored per rank when the world size and the parallel layout equal the saved ones.
Otherwise the states cannot be mapped to ranks; every generator is reseeded deterministically
from the step (or ``seed``) and a warning says so: runs stay reproducible, but differ from the
uninterrupted run.

**megatron-core 0.16.1 workarounds** (``optimizer_fixes.py``). With torch's own Adam/SGD (no
transformer-engine or apex, on GPU as on the CPU), megatron's optimizers need their
per-parameter state to exist before a save or load, and its load path needs three fixes around
our load call only; each is named there with megatron's file and line.
"""

from vp2o.mcore.checkpoint.errors import CheckpointError, dcp_cause
from vp2o.mcore.checkpoint.markers import (
    FORMAT_VERSION,
    MARKER,
    TRAINER_STATE,
    checkpoint_kind,
    checkpoints_of_other_kinds,
    complete_checkpoints,
    latest_checkpoint,
    read_marker,
    recover_replaced,
    step_dir,
)
from vp2o.mcore.checkpoint.save_load import (
    RNG_DIR,
    SHARDING_METADATA,
    check_fits,
    load_checkpoint,
    reading_tensors,
    save_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "MARKER",
    "RNG_DIR",
    "SHARDING_METADATA",
    "TRAINER_STATE",
    "CheckpointError",
    "check_fits",
    "checkpoint_kind",
    "checkpoints_of_other_kinds",
    "complete_checkpoints",
    "dcp_cause",
    "latest_checkpoint",
    "load_checkpoint",
    "read_marker",
    "reading_tensors",
    "recover_replaced",
    "save_checkpoint",
    "step_dir",
]
