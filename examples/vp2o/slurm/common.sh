#!/usr/bin/env bash
# Shared body of the vp2o sbatch scripts (sourced by them; not submitted on its own).
#
# Inputs (environment, with defaults): CONFIG (YAML, required), VP2O_REPO (repository root,
# default the submit directory), GPUS_PER_NODE (8), RUN_ROOT ($VP2O_REPO/runs), MASTER_PORT
# (derived from the job id), CONTAINER_IMAGE / CONTAINER_MOUNTS (optional: run inside a
# container with pyxis' srun --container-image), WANDB_MODE (online), WANDB_PROJECT (vp2o),
# EXTRA_OVERRIDES (more key=value overrides), VP2O_PYTHON (python3).
#
# One task per node: srun starts `python -m vp2o.launch` (torchrun that forwards SIGUSR1 to its
# workers) on every node, with a static rendezvous on the first host of the allocation and
# node rank $SLURM_NODEID. The run directory is per job id, which a requeued job keeps, so
# `train.resume=auto` continues from the checkpoint written on SIGUSR1.
set -euo pipefail

: "${CONFIG:?set CONFIG to a YAML file under examples/vp2o/configs/}"
VP2O_REPO=${VP2O_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_JOB_NUM_NODES:-1}
RUN_ROOT=${RUN_ROOT:-$VP2O_REPO/runs}
RUN_DIR=${RUN_DIR:-$RUN_ROOT/${SLURM_JOB_NAME:-vp2o}-${SLURM_JOB_ID:-local}}
VP2O_PYTHON=${VP2O_PYTHON:-python3}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
mkdir -p "$RUN_DIR"
cd "$VP2O_REPO"

# --- NCCL / CUDA ---------------------------------------------------------------------------
export CUDA_DEVICE_MAX_CONNECTIONS=1            # megatron: ordered TP/SP comm kernels
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1        # a dead rank fails the job, not a hang
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_QPS_PER_CONNECTION=${NCCL_IB_QPS_PER_CONNECTION:-4}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5  # site-specific: set for your fabric
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1

# --- wandb ---------------------------------------------------------------------------------
export WANDB_PROJECT=${WANDB_PROJECT:-vp2o}
export WANDB_MODE=${WANDB_MODE:-online}
export WANDB_DIR=$RUN_DIR
export WANDB_RUN_ID=${WANDB_RUN_ID:-${SLURM_JOB_NAME:-vp2o}-${SLURM_JOB_ID:-local}}
export WANDB_RESUME=allow                      # a requeued job appends to the same run

OVERRIDES=("train.run_dir=$RUN_DIR" "train.resume=auto" "train.wandb_mode=$WANDB_MODE"
           "train.wandb_project=$WANDB_PROJECT" "parallel.backend=nccl")
if [[ -n "${EXTRA_OVERRIDES:-}" ]]; then
  read -r -a extra <<<"$EXTRA_OVERRIDES"
  OVERRIDES+=("${extra[@]}")
fi

# Check the layout before any GPU is touched (fails on a layout that does not divide).
"$VP2O_PYTHON" -m vp2o.cli launch --dry-run "$CONFIG" --nodes "$NNODES" \
  --gpus-per-node "$GPUS_PER_NODE" --hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" |
  paste -sd,)" --port "$MASTER_PORT" "${OVERRIDES[@]}" | tee "$RUN_DIR/launch-${SLURM_JOB_ID:-local}.txt"

SRUN=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  SRUN+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$VP2O_REPO"
         --container-mounts="${CONTAINER_MOUNTS:-$VP2O_REPO:$VP2O_REPO}")
fi

# SLURM_NODEID is expanded by each task, hence the single quotes around the inner command.
# shellcheck disable=SC2016
"${SRUN[@]}" bash -c '"$0" -m vp2o.launch --nnodes="$1" --nproc_per_node="$2" \
  --node_rank="$SLURM_NODEID" --rdzv_backend=static --rdzv_endpoint="$3" \
  -m vp2o.cli train --config "$4" "${@:5}"' \
  "$VP2O_PYTHON" "$NNODES" "$GPUS_PER_NODE" "$HEAD_NODE:$MASTER_PORT" "$CONFIG" "${OVERRIDES[@]}"
