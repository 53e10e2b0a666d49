# shellcheck shell=bash
# The body of the examples/pivot_*_h100.sbatch files (sourced by them after they set their defaults):
# one `pivot-mega train` stage over NODES x GPUS_PER_NODE tasks launched by srun, one task per GPU.
# Ranks come from Slurm (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the rendezvous host is the
# first node of the step, at its Slurm NodeAddr (MASTER_ADDR, below), the port 29500 + job id mod
# 10000: pivot_mega/parallel/mesh.py), so no torchrun is needed.
#
# Variables (set them in the environment of `sbatch`, or edit the defaults in the .sbatch file):
#   CONFIG            run config YAML (required)
#   OUT_DIR           train.out_dir override (empty: the config's)
#   DATA              data.shards override (empty: the config's)
#   INIT_FROM         init_from override (empty: the config's)
#   EXTRA_SETS        more overrides, space-separated key=value (also: arguments after the .sbatch file)
#   CONTAINER         container image for pyxis/enroot (srun --container-image): a registry image
#                     (nvcr.io#org/pivot-mega:TAG) or an .sqsh file; empty: run on the host
#   CONTAINER_MOUNTS  extra pyxis mounts SRC:DST[,...]; PIVOT_ROOT and LOG_DIR are always mounted at
#                     the same paths (put data and OUT_DIR under them, or mount them here)
#   PIVOT_DEVICE      cuda (default) or cpu: CPU mode runs gloo ranks without GPUs (tests, debugging)
#   PIVOT_ROOT        the repository (default: the directory sbatch was called from)
#   LOG_DIR           where the job's requeue markers go; the default, logs/ of the directory sbatch
#                     was called from, is where #SBATCH --output puts the job logs
#   PIVOT_BIN         the trainer command (default: pivot-mega)
#   MAX_RESTARTS      requeue at most this many times (default 20)
#
# Requeue and resume: `--signal=USR1@120` (without `B:`, so the tasks get it) warns the trainer two
# minutes before the time limit; it finishes its step, saves a checkpoint and exits 0. The task
# wrapper (pivot_task.sh) notes the signal; this script then runs `scontrol requeue` (the job needs
# `--requeue`), and the next start resumes from OUT/checkpoints/latest: every start passes
# `--set train.resume=auto`. SLURM_RESTART_COUNT counts the starts after the first.
set -euo pipefail

: "${CONFIG:?CONFIG: set the run config YAML}"
: "${OUT_DIR:=}"
: "${DATA:=}"
: "${INIT_FROM:=}"
: "${EXTRA_SETS:=}"
: "${CONTAINER:=}"
: "${CONTAINER_MOUNTS:=}"
: "${PIVOT_DEVICE:=cuda}"
: "${PIVOT_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${PIVOT_BIN:=pivot-mega}"
: "${LOG_DIR:=${SLURM_SUBMIT_DIR:-$PWD}/logs}"
: "${MAX_RESTARTS:=20}"

restart=${SLURM_RESTART_COUNT:-0}
echo "pivot_train: job ${SLURM_JOB_ID:-?} start ${restart} on ${SLURM_JOB_NUM_NODES:-1} node(s)" \
  "(${SLURM_JOB_NODELIST:-?}), ${SLURM_NTASKS:-1} task(s), device ${PIVOT_DEVICE}, config ${CONFIG}"

# ---- rendezvous -------------------------------------------------------------------------------
# Rank 0 runs on the first node of the job; the other ranks reach it at that node's NodeAddr, the
# address Slurm itself uses to reach the node (the node's name where slurm.conf sets none, so most
# clusters get the name, as before). A MASTER_ADDR set by the user is kept.
if [[ -z ${MASTER_ADDR:-} && -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null; then
  first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p) || first_node=""
  if [[ -n $first_node ]]; then
    node_addr=$(scontrol show node -o "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p') || node_addr=""
    export MASTER_ADDR=${node_addr:-$first_node}
    echo "pivot_train: rendezvous on ${first_node} at ${MASTER_ADDR}"
  fi
fi

# ---- environment of every task ----------------------------------------------------------------
# One OpenMP/MKL thread pool per task, sized to its CPUs (the default is every core of the node).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TOKENIZERS_PARALLELISM=false
if [[ $PIVOT_DEVICE == cuda ]]; then
  # A failed or timed-out NCCL collective aborts the communicators and ends the process, so the job
  # fails (and can be resubmitted) instead of hanging until its time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # Freed blocks are remapped into growing segments: far less fragmentation with packed rows of
  # varying length and FSDP's gather/free cycle. Set before the tasks start (pivot-mega's entry point
  # sets the same default under other launchers); a user's setting under either name is kept: torch
  # reads PYTORCH_CUDA_ALLOC_CONF first, so setting it would hide a PYTORCH_ALLOC_CONF.
  if [[ -z ${PYTORCH_CUDA_ALLOC_CONF+set} && -z ${PYTORCH_ALLOC_CONF+set} ]]; then
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  fi
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Left to NCCL's defaults on purpose (set them per site if needed):
  #  - NCCL_IB_HCA / NCCL_SOCKET_IFNAME: NCCL finds the InfiniBand HCAs and a bootstrap interface
  #    itself; name them (e.g. NCCL_IB_HCA=mlx5_0,mlx5_1,...) only where it picks a storage or
  #    management NIC. RoCE fabrics may need NCCL_IB_GID_INDEX.
  #  - NCCL_NVLS_ENABLE: NVLink SHARP (H100 NVSwitch systems) is on by default; 0 frees its buffers
  #    (about 1 GiB per GPU) if memory is that tight.
  #  - CUDA_DEVICE_MAX_CONNECTIONS: Megatron sets 1 for its TP communication overlap; here FSDP2
  #    overlaps all-gathers and reduce-scatters on separate streams, which 1 would serialise.
else
  export CUDA_VISIBLE_DEVICES=""
fi

# ---- the command ------------------------------------------------------------------------------
sets=(--set train.resume=auto)
[[ -n $OUT_DIR ]] && sets+=(--set "train.out_dir=$OUT_DIR")
[[ -n $DATA ]] && sets+=(--set "data.shards=$DATA")
[[ -n $INIT_FROM ]] && sets+=(--set "init_from=$INIT_FROM")
read -r -a extra <<<"$EXTRA_SETS"
for item in "${extra[@]}" "$@"; do
  sets+=(--set "$item")
done

srun_args=(--kill-on-bad-exit=1)
if [[ -n $CONTAINER ]]; then
  mounts=$PIVOT_ROOT:$PIVOT_ROOT
  [[ $LOG_DIR == "$PIVOT_ROOT"/* ]] || mounts+=,$LOG_DIR:$LOG_DIR
  mounts+=${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}
  srun_args+=(--container-image="$CONTAINER" --container-mounts="$mounts" --container-workdir="$PWD")
fi

mkdir -p "$LOG_DIR"
marker=$LOG_DIR/.requeue-${SLURM_JOB_ID:-0}-$restart
rm -f "$marker"

set +e
srun "${srun_args[@]}" bash "$PIVOT_ROOT/examples/slurm/pivot_task.sh" "$marker" \
  "$PIVOT_BIN" train "$CONFIG" "${sets[@]}"
status=$?
set -e

if [[ -e $marker ]]; then
  rm -f "$marker"
  if ((status != 0)); then
    echo "pivot_train: signalled, but the trainer exited with $status: not requeueing" >&2
  elif ((restart >= MAX_RESTARTS)); then
    echo "pivot_train: signalled after $restart restarts (MAX_RESTARTS=$MAX_RESTARTS): not requeueing" >&2
  else
    echo "pivot_train: the run saved a checkpoint on SIGUSR1; requeueing job $SLURM_JOB_ID to resume it"
    scontrol requeue "$SLURM_JOB_ID"
  fi
fi
exit "$status"
