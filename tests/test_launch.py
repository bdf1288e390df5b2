"""The launchers: valid bash, shellcheck-clean, and dry runs that print each worker's command."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("local.sh", "slurm.sh", "tpu_pod.sh")


def dry_run(script, *args, **env):
  out = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", script), *args],
      env=dict(os.environ, DRY_RUN="1", **env),
      capture_output=True,
      text=True,
      check=True,
  )
  return out.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_shellcheck(script):
  path = os.path.join(ROOT, "launch", script)
  subprocess.run(["bash", "-n", path], check=True)
  result = subprocess.run(["shellcheck", path], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_local_dry_run_prints_the_command_and_hides_the_key():
  lines = dry_run(
      "local.sh",
      "configs/quickstart.py",
      "runs/qs",
      "--config.train.lr=1e-3",
      OPENAI_API_KEY="sk-secret",
      JAX_PLATFORMS="cpu",
  )
  assert lines[0] == f"cwd: {ROOT}"
  assert "env: JAX_PLATFORMS=cpu" in lines and "env: OPENAI_API_KEY=<set>" in lines
  assert not any("sk-secret" in line for line in lines)
  assert lines[-1] == (
      "run: 'python' '-m' 'tailored_jax.main' '--config=configs/quickstart.py' "
      "'--workdir=runs/qs' '--config.train.lr=1e-3'"
  )


def test_slurm_dry_run_prints_one_process_per_node():
  lines = dry_run(
      "slurm.sh", "configs/gsm8k_gptj6b.py", "/shared/run", "--config.rounds=2", NODES="2"
  )
  assert lines[1].startswith(
      "run: 'srun' '--ntasks-per-node=1' 'python' '-m' 'tailored_jax.main' '--distributed'"
  )
  assert lines[2:] == [
      f"node {rank}: SLURM_PROCID={rank} SLURM_NTASKS=2 coordinator=node0 python -m "
      "tailored_jax.main --distributed --config=configs/gsm8k_gptj6b.py --workdir=/shared/run "
      "--config.rounds=2"
      for rank in (0, 1)
  ]


def test_tpu_pod_dry_run_prints_every_workers_command():
  lines = dry_run(
      "tpu_pod.sh",
      "my-tpu",
      "us-central2-b",
      "configs/gsm8k_llama3_8b.py",
      "/mnt/run",
      "--config.mesh.preset=tpu-v4-32",
      WORKERS="4",
      TAILORED_JAX_DIR="/opt/tj",
  )
  remote = (
      "cd /opt/tj && python -m tailored_jax.main --distributed "
      "--config=configs/gsm8k_llama3_8b.py --workdir=/mnt/run "
      "--config.mesh.preset=tpu-v4-32"
  )
  assert lines[0] == (
      "run: 'gcloud' 'compute' 'tpus' 'tpu-vm' 'ssh' 'my-tpu' "
      f"'--zone=us-central2-b' '--worker=all' '--command' '{remote}'"
  )
  assert lines[1:] == [f"worker {w}: {remote}" for w in range(4)]
