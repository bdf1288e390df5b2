#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker (jax.distributed.initialize() finds
# the pod by itself). The repo must already be installed on each worker
# (`pip install -e .` with jax[tpu]); WORKDIR must be shared (e.g. a mounted bucket or NFS).
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.X=Y ...]
# DRY_RUN=1 prints the gcloud command and what each of WORKERS (default 1) workers runs, and
# runs nothing.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
zone=${2:?zone}
config=${3:?config}
workdir=${4:?workdir}
shift 4
repo=${TAILORED_JAX_DIR:-tailored_jax}
overrides=$(printf ' %q' "$@")
remote="cd $repo && python -m tailored_jax.main --distributed --config=$config --workdir=$workdir$overrides"
command=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command "$remote")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "run: ${command[*]@Q}"
  for ((worker = 0; worker < ${WORKERS:-1}; worker++)); do
    echo "worker $worker: $remote"
  done
  exit 0
fi
exec "${command[@]}"
