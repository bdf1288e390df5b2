"""Multi-host start-up under a simulated SLURM allocation: two processes, one per "node", each
given 4 GPUs; the CPU stands in for them (4 forced host devices per process)."""

import os
import socket
import subprocess
import sys

import pytest

from tailored_jax import cluster
from tests.processes import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_slurm_gpus_one_task_per_node_takes_all_its_nodes_gpus():
  node = {
      "SLURM_JOB_ID": "7",
      "SLURM_PROCID": "1",
      "SLURM_NTASKS": "2",
      "SLURM_STEP_NUM_NODES": "2",
  }
  assert cluster.slurm_gpus({**node, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == [0, 1, 2, 3]
  assert cluster.slurm_gpus({**node, "SLURM_GPUS_ON_NODE": "8"}) == list(range(8))
  assert cluster.slurm_gpus(node) is None  # no GPUs asked for
  assert cluster.slurm_gpus({**node, "SLURM_NTASKS": "16", "SLURM_GPUS_ON_NODE": "8"}) is None
  assert cluster.slurm_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) is None  # not SLURM
  with pytest.raises(cluster.ClusterError, match=r"2 nodes 4 GPUs \(8 in all\).* holds 1 devices"):
    cluster.check_devices(4, 2, 1, 2)


def _slurm_port() -> tuple[int, int]:
  """(job id, port): JAX's SLURM detection puts the coordinator on port job_id % 4096 + 61440."""
  for port in range(61440 + os.getpid() % 4096, 65536):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return port - 61440, port
  raise RuntimeError("no free port in JAX's SLURM range")


def run_nodes(tmp_path, gpus_per_node: int, host_devices: int) -> list[subprocess.CompletedProcess]:
  job_id, _ = _slurm_port()
  config = tmp_path / "c.py"
  config.write_text("from tests.test_rounds import tiny_config as get_config\n")
  procs = []
  for node in range(2):
    env = child_env(
        host_devices,
        SLURM_JOB_ID=str(job_id),
        SLURM_STEP_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="2",
        SLURM_STEP_NUM_NODES="2",
        SLURM_NTASKS="2",
        SLURM_PROCID=str(node),
        SLURM_LOCALID="0",
        SLURM_NODEID=str(node),
        SLURM_GPUS_ON_NODE=str(gpus_per_node),
        CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus_per_node))),
    )
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import jax; jax.config.update('jax_cpu_collectives_implementation', 'gloo'); "
                "from tailored_jax import main; main.run()",
                "--distributed",
                f"--config={config}",
                "--dry_run",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  try:
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def test_each_node_uses_every_gpu_slurm_gave_it(tmp_path):
  """2 nodes x 4 GPUs: each process makes GPUs 0-3 visible (JAX alone would take GPU 0 of each
  node) and the run holds 8 devices."""
  for node, done in enumerate(run_nodes(tmp_path, gpus_per_node=4, host_devices=4)):
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"process {node} of 2: 4 local devices (GPU ids 0,1,2,3), 8 in the run" in done.stderr


def test_a_node_holding_fewer_devices_than_it_was_given_stops_with_both_numbers(tmp_path):
  for done in run_nodes(tmp_path, gpus_per_node=4, host_devices=2):
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: SLURM gave each of 2 nodes 4 GPUs (8 in all), but this process holds 2 devices "
        "and the run 4: check --gpus-per-node and that every GPU is free"
    )
