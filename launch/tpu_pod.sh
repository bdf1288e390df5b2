#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker (jax.distributed.initialize() finds
# the pod by itself). The repo must already be installed on each worker (`pip install -e .` with
# jax[tpu]) in TAILORED_JAX_DIR (default: tailored_jax under the worker's home), in the
# virtualenv TAILORED_JAX_ENV when given; WORKDIR must be shared (a mounted bucket or NFS).
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.X=Y ...]
# The teacher's key ($OPENAI_API_KEY, or the variable TEACHER_KEY_ENV names), when set here, goes
# to worker 0 alone (process 0 alone calls the teacher) through ssh's standard input into a
# mode-600 file that the run reads (teacher.api_key_file): on no command line, log or workdir.
# DRY_RUN=1 prints the gcloud commands and what each of WORKERS (default 1) workers runs, the
# key masked, and runs nothing.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
zone=${2:?zone}
config=${3:?config}
workdir=${4:?workdir}
shift 4
repo=${TAILORED_JAX_DIR:-tailored_jax}
key_env=${TEACHER_KEY_ENV:-OPENAI_API_KEY}
key_file=.tailored_jax/teacher_key # under the worker's home
remote="cd $(printf %q "$repo")"
if [[ -n "${TAILORED_JAX_ENV:-}" ]]; then
  remote+=" && source $(printf %q "$TAILORED_JAX_ENV")/bin/activate"
fi
remote+=" && python -m tailored_jax.main --distributed --config=$(printf %q "$config")"
remote+=" --workdir=$(printf %q "$workdir")"
key=${!key_env:-}
if [[ -n "$key" ]]; then
  remote+=" --config.teacher.api_key_file=\$HOME/$key_file"
fi
if (($#)); then
  remote+=$(printf ' %q' "$@")
fi
store_key="umask 077 && mkdir -p \"\$HOME/.tailored_jax\" && cat > \"\$HOME/$key_file\""
copy=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=0 --command "$store_key")
command=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command "$remote")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  if [[ -n "$key" ]]; then
    echo "key: $key_env=<set>, to worker 0's ~/$key_file (mode 600) on standard input of:"
    echo "copy: ${copy[*]@Q}"
  fi
  echo "run: ${command[*]@Q}"
  for ((worker = 0; worker < ${WORKERS:-1}; worker++)); do
    echo "worker $worker: $remote"
  done
  exit 0
fi
if [[ -n "$key" ]]; then
  printf '%s\n' "$key" | "${copy[@]}"
fi
exec "${command[@]}"
