#!/usr/bin/env bash
# Multi-GPU / multi-node on SLURM, one process per node (JAX sees every local GPU):
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh CONFIG WORKDIR [--config.X=Y ...]
# WORKDIR must be on a filesystem every node sees: process 0 writes it, all read it.
#SBATCH --job-name=tailored_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=${1:?usage: launch/slurm.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/slurm.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# jax.distributed.initialize() reads the coordinator and ranks from SLURM's environment.
exec srun --ntasks-per-node=1 python -m tailored_jax.main --distributed \
  --config="$config" --workdir="$workdir" "$@"
