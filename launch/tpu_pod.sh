#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker (jax.distributed.initialize() finds
# the pod by itself). The repo must already be installed on each worker
# (`pip install -e .` with jax[tpu]); WORKDIR must be shared (e.g. a mounted bucket or NFS).
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.X=Y ...]
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
zone=${2:?zone}
config=${3:?config}
workdir=${4:?workdir}
shift 4
repo=${TAILORED_JAX_DIR:-tailored_jax}
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd $repo && python -m tailored_jax.main --distributed --config=$config --workdir=$workdir$overrides"
