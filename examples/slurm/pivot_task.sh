#!/usr/bin/env bash
# One Slurm task of a pivot_mega run (srun starts one per GPU):
#
#   pivot_task.sh MARKER COMMAND [ARG...]
#
# Runs COMMAND and creates the file MARKER if SIGUSR1 arrives: Slurm's pre-timeout warning
# (#SBATCH --signal=USR1@120) or `scancel --signal=USR1 JOBID`. The batch script then knows that the
# run stopped to be requeued, not that it finished. Slurm signals every process of a job step, so
# the trainer receives the same SIGUSR1 directly (it finishes the step, saves a checkpoint and exits
# 0); nothing is forwarded from here. The exit status is COMMAND's.
set -u

if (($# < 2)); then
  echo "usage: $0 MARKER COMMAND [ARG...]" >&2
  exit 2
fi
marker=$1
shift

trap ': > "$marker"' USR1
"$@" &
child=$!
# `wait` returns early (status 138) when the trapped signal arrives: wait again until COMMAND exits.
status=0
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
  status=$?
done
exit "$status"
