#!/usr/bin/env bash
# Profiles training steps START..END of a run with Nsight Systems.
#
#   tools/profile_nsys.sh CONFIG START END [KEY=VALUE ...]
#
# Runs `nsys profile --capture-range=cudaProfilerApi ... pivot-mega train CONFIG
# --set profile.nsys_steps=[START,END] --set KEY=VALUE ...`: the trainer calls cudaProfilerStart
# before step START and cudaProfilerStop after step END, so the report holds those steps only (the
# start-up, data warm-up and compilation stay out of it), with the NVTX ranges of each step (step_N,
# data, forward_backward, optimizer), CUDA kernels and memory, cuDNN/cuBLAS calls and OS runtime.
#
# Environment:
#   NSYS_OUT      report path without extension (default runs/nsys/pivot_<START>-<END>; a rank suffix
#                 _rank<R> is added when run as a Slurm task)
#   LAUNCHER      launcher before pivot-mega, e.g. "torchrun --nproc-per-node 8 --no-python" (nsys
#                 follows the child processes: one report for all local ranks); empty: one process
#   PIVOT_BIN     the trainer command (default pivot-mega)
#   NSYS          the nsys binary (default nsys)
#   NSYS_EXTRA    more nsys options, space-separated (e.g. "--gpu-metrics-devices=all")
#   DRY_RUN=1     print the command instead of running it
#
# Under Slurm, profile some ranks of a job by running this script as the task command, e.g.
#   srun ... tools/profile_nsys.sh examples/configs/train_dpo.yaml 20 22
# which writes one report per rank (runs/nsys/pivot_20-22_rank<R>.nsys-rep).
set -euo pipefail

if (($# < 3)); then
  sed -n '2,26p' "$0" >&2
  exit 2
fi
config=$1
start=$2
end=$3
shift 3
if ! [[ $start =~ ^[0-9]+$ && $end =~ ^[0-9]+$ ]] || ((start < 1 || end < start)); then
  echo "profile_nsys.sh: START and END must be step numbers with 1 <= START <= END, got '$start' '$end'" >&2
  exit 2
fi

: "${NSYS:=nsys}"
: "${PIVOT_BIN:=pivot-mega}"
: "${LAUNCHER:=}"
: "${NSYS_EXTRA:=}"
: "${DRY_RUN:=0}"
: "${NSYS_OUT:=runs/nsys/pivot_${start}-${end}${SLURM_PROCID:+_rank$SLURM_PROCID}}"

read -r -a launcher <<<"$LAUNCHER"
read -r -a nsys_extra <<<"$NSYS_EXTRA"
sets=(--set "profile.nsys_steps=[$start,$end]")
for item in "$@"; do
  sets+=(--set "$item")
done

cmd=(
  "$NSYS" profile
  --capture-range=cudaProfilerApi --capture-range-end=stop
  "--trace=cuda,nvtx,osrt,cudnn,cublas"
  --cuda-memory-usage=true
  --sample=none --cpuctxsw=none
  --force-overwrite=true
  --output="$NSYS_OUT"
  "${nsys_extra[@]}"
  "${launcher[@]}" "$PIVOT_BIN" train "$config" "${sets[@]}"
)

if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
if ! command -v "$NSYS" >/dev/null; then
  echo "profile_nsys.sh: '$NSYS' not found: Nsight Systems comes with NGC PyTorch containers and the CUDA" \
    "toolkit (set NSYS to its path)" >&2
  exit 127
fi
mkdir -p "$(dirname "$NSYS_OUT")"
"${cmd[@]}"
echo "profile_nsys.sh: report ${NSYS_OUT}.nsys-rep (open it in nsys-ui, or: nsys stats ${NSYS_OUT}.nsys-rep)"
