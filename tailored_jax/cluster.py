"""Joining a multi-host run: `jax.distributed` with every accelerator the scheduler gave this
host, checked at start.

Under SLURM with one process per node (`launch/slurm.sh`), JAX's own detection restricts each
process to GPU `SLURM_LOCALID`, i.e. GPU 0 of every node: a 2 x 8 GPU job would train on 2.
Here the process takes every GPU SLURM gave its node, and the run stops at once, naming both
numbers, when the devices it holds are not all of them.
"""

from __future__ import annotations

import logging
import os

import jax


class ClusterError(RuntimeError):
  """The run does not hold the accelerators the scheduler gave it."""


def slurm_gpus(env) -> list[int] | None:
  """The GPU ids (as this process numbers them) a SLURM process with one task per node should
  use: all its node's. None outside SLURM, without GPUs, or with one task per GPU (there JAX's
  [SLURM_LOCALID] is right)."""
  if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
    return None
  visible = [x for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
  count = len(visible) or int(env.get("SLURM_GPUS_ON_NODE") or 0)
  nodes = _nodes(env)
  if not count or int(env.get("SLURM_NTASKS") or nodes) != nodes:
    return None
  return list(range(count))  # CUDA numbers the visible GPUs from 0


def _nodes(env) -> int:
  return int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1)


def initialize(env=None) -> None:
  """`jax.distributed.initialize()`, with this node's GPUs under SLURM; then the check."""
  env = os.environ if env is None else env
  gpus = slurm_gpus(env)
  if gpus is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(local_device_ids=gpus)
  visible = ",".join(map(str, gpus)) if gpus is not None else "as JAX detects them"
  logging.info(
      "process %d of %d: %d local devices (GPU ids %s), %d in the run",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      visible,
      jax.device_count(),
  )
  if gpus is not None:
    check_devices(len(gpus), _nodes(env), jax.local_device_count(), jax.device_count())


def check_devices(per_node: int, nodes: int, local: int, total: int) -> None:
  """Stops (ClusterError) unless this process holds its node's `per_node` accelerators and the
  run all `nodes` x `per_node`."""
  if local != per_node or total != nodes * per_node:
    raise ClusterError(
        f"SLURM gave each of {nodes} nodes {per_node} GPUs ({nodes * per_node} in all), but this "
        f"process holds {local} devices and the run {total}: check --gpus-per-node and that "
        "every GPU is free"
    )
