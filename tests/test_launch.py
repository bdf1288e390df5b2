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
  # SLURM warns every process before the time limit; the run saves and exits 75 on it
  with open(os.path.join(ROOT, "launch", "slurm.sh")) as f:
    directives = [line for line in f if line.startswith("#SBATCH")]
  assert "#SBATCH --signal=USR1@120\n" in directives


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


def test_tpu_pod_dry_run_activates_the_env_quotes_paths_and_masks_the_key():
  lines = dry_run(
      "tpu_pod.sh",
      "my-tpu",
      "us-central2-b",
      "configs/my config.py",
      "/mnt/my run",
      OPENAI_API_KEY="sk-secret",
      TAILORED_JAX_ENV="/opt/venvs/tj env",
  )
  assert not any("sk-secret" in line for line in lines)
  assert lines[0].startswith("key: OPENAI_API_KEY=<set>, to worker 0's ~/.tailored_jax/teacher_key")
  assert "'--worker=0'" in lines[1] and "umask 077" in lines[1]
  assert lines[-1] == (
      "worker 0: cd tailored_jax && source /opt/venvs/tj\\ env/bin/activate && python -m "
      "tailored_jax.main --distributed --config=configs/my\\ config.py --workdir=/mnt/my\\ run "
      "--config.teacher.api_key_file=$HOME/.tailored_jax/teacher_key"
  )


def test_tpu_pod_launch_sends_the_key_to_worker_0_on_standard_input_only(tmp_path):
  """A stand-in `gcloud` records every command line and runs worker 0's `--command` as the
  worker's shell would (HOME: a folder of the test): the key reaches a mode-600 file there and
  no command line."""
  bin_dir, home = tmp_path / "bin", tmp_path / "worker0_home"
  bin_dir.mkdir()
  home.mkdir()
  (bin_dir / "gcloud").write_text(
      "#!/usr/bin/env bash\n"
      'printf "%s\\n" "$*" >> "$CALLS"\n'
      'for a in "$@"; do [[ $prev == --command ]] && command=$a; prev=$a; done\n'
      'if [[ " $* " == *" --worker=0 "* ]]; then HOME="$WORKER0_HOME" bash -c "$command"; fi\n'
  )
  (bin_dir / "gcloud").chmod(0o755)
  calls = tmp_path / "calls"
  subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "t", "z", "c.py", "/w"],
      env=dict(
          os.environ,
          PATH=f"{bin_dir}:{os.environ['PATH']}",
          CALLS=str(calls),
          WORKER0_HOME=str(home),
          MY_KEY="sk-secret",
          TEACHER_KEY_ENV="MY_KEY",
      ),
      check=True,
  )
  lines = calls.read_text().splitlines()
  assert len(lines) == 2 and "--worker=0" in lines[0] and "--worker=all" in lines[1]
  assert not any("sk-secret" in line for line in lines)
  key_file = home / ".tailored_jax" / "teacher_key"
  assert key_file.read_text() == "sk-secret\n" and (key_file.stat().st_mode & 0o777) == 0o600
  assert "--config.teacher.api_key_file=$HOME/.tailored_jax/teacher_key" in lines[1]
