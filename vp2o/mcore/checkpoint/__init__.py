"""Training checkpoints; the code is in ``save_load`` (moved here from vp2o/mcore/checkpoint.py
unchanged, to be split by concern)."""

from vp2o.mcore.checkpoint.save_load import (
    FORMAT_VERSION,
    MARKER,
    RNG_DIR,
    SHARDING_METADATA,
    TRAINER_STATE,
    CheckpointError,
    check_fits,
    checkpoint_kind,
    checkpoints_of_other_kinds,
    complete_checkpoints,
    dcp_cause,
    latest_checkpoint,
    load_checkpoint,
    read_marker,
    reading_tensors,
    save_checkpoint,
    step_dir,
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
    "save_checkpoint",
    "step_dir",
]
