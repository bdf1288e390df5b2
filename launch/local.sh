#!/usr/bin/env bash
# Run tailored_jax on this machine (CPU or its GPUs): launch/local.sh CONFIG WORKDIR [--config.X=Y ...]
# DRY_RUN=1 prints the command and the environment it would run with, and runs nothing.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "$(dirname "$0")/.."
command=(python -m tailored_jax.main --config="$config" --workdir="$workdir" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "cwd: $PWD"
  for name in JAX_PLATFORMS CUDA_VISIBLE_DEVICES XLA_FLAGS OPENAI_API_KEY; do
    if [[ -n "${!name:-}" ]]; then
      if [[ "$name" == OPENAI_API_KEY ]]; then echo "env: $name=<set>"; else echo "env: $name=${!name}"; fi
    fi
  done
  echo "run: ${command[*]@Q}"
  exit 0
fi
exec "${command[@]}"
