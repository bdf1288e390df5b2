#!/usr/bin/env bash
# Run tailored_jax on this machine (CPU or its GPUs): launch/local.sh CONFIG WORKDIR [--config.X=Y ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "$(dirname "$0")/.."
exec python -m tailored_jax.main --config="$config" --workdir="$workdir" "$@"
