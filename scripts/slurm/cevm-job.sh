#!/bin/bash
# One cevm VM as a Slurm batch job that survives preemption, time limits and
# node failures, on storage every node sees:
#
#   sbatch --signal=B:USR1@120 scripts/slurm/cevm-job.sh /shared/ckpt/job1 \
#       --every 10m -- --guest digest --guest-args "rounds=100" --mem 1G
#
# Everything after the series directory goes to `cevm batch` (options, then
# `--` and the guest's `cevm run` arguments for its first start). Each start
# restores the newest checkpoint of the series that verifies (or boots the
# guest); SIGUSR1 (the warning, --signal=B:USR1@SECONDS, or `scancel
# --signal=USR1 --batch`) takes a last checkpoint and the job asks to be
# requeued; SIGTERM (`scontrol requeue`, preemption, `scancel`, the kill
# before KillWait) takes a last checkpoint and leaves it to Slurm whether the
# job runs again; a node failure requeues it from the newest periodic
# checkpoint.
# A job that finished is not run again. $CEVM names the cevm binary
# (default: cevm on the PATH).
#
# A group of VMs, one per task of the job, each started on its node by srun
# and checkpointed together at one consistent cut, is the same with --group
# ({rank} and {size} in the guest's arguments become the member's rank and
# the number of members):
#
#   sbatch -N 2 --ntasks-per-node=1 --signal=B:USR1@120 scripts/slurm/cevm-job.sh \
#       /shared/ckpt/ring --group --every 10m -- --guest netring \
#       --guest-args "id={rank} count={size}" --mem 1G --net "tap=cevm0,mac=52:54:00:ce:00:0{rank}"
#SBATCH --requeue
#SBATCH --open-mode=append
set -eu
dir=$1
shift
# cevm, a real program, takes Slurm's signals itself (a shell's trap can lose them).
exec "${CEVM:-cevm}" batch --dir "$dir" "$@"
