#!/usr/bin/env bash
# Multi-GPU / multi-node on SLURM, one process per node, holding every GPU SLURM gave its node
# (tailored_jax/cluster.py; the run stops at start, naming both counts, if it holds fewer):
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh CONFIG WORKDIR [--config.X=Y ...]
# WORKDIR must be on a filesystem every node sees: process 0 writes it, all read it.
# DRY_RUN=1 (outside or inside an allocation) prints the srun command and, per node, the
# process id and coordinator jax.distributed.initialize() will read, and runs nothing;
# NODES=N stands in for SLURM_JOB_NUM_NODES outside an allocation.
# Two minutes before the time limit SLURM sends SIGUSR1 to every process: training saves a
# checkpoint at the next step all agree on and the run exits 75; submit the same command again
# (or add --requeue) to resume.
#SBATCH --job-name=tailored_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=USR1@120
set -euo pipefail
config=${1:?usage: launch/slurm.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/slurm.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# jax.distributed.initialize() reads the coordinator and ranks from SLURM's environment.
command=(srun --ntasks-per-node=1 python -m tailored_jax.main --distributed
  --config="$config" --workdir="$workdir" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  nodes=${SLURM_JOB_NUM_NODES:-${NODES:-1}}
  first=node0
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol > /dev/null; then
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
  echo "cwd: $PWD"
  echo "run: ${command[*]@Q}"
  for ((rank = 0; rank < nodes; rank++)); do
    echo "node $rank: SLURM_PROCID=$rank SLURM_NTASKS=$nodes coordinator=$first" \
      "python -m tailored_jax.main --distributed --config=$config --workdir=$workdir$(printf ' %q' "$@")"
  done
  exit 0
fi
exec "${command[@]}"
