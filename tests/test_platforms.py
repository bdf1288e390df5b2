"""A run on a host without a TPU starts no TPU backend even with libtpu installed (the test
extra brings it): no libtpu start-up errors, no 700 MB library mapped."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "import jax; from tailored_jax import platforms; platforms.skip_absent_tpu(); "
    "print(jax.devices()[0].platform, jax.config.jax_platforms)"
)


def test_no_tpu_backend_starts_on_a_host_without_a_tpu():
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  done = subprocess.run(
      [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split()[0] in ("cpu", "gpu")
  assert "libtpu" not in done.stderr and "TPU_WORKER_HOSTNAMES" not in done.stderr, done.stderr
  chosen = subprocess.run(  # a platform the user chose is left alone
      [sys.executable, "-c", PROBE],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=dict(env, JAX_PLATFORMS="cpu"),
      timeout=120,
  )
  assert chosen.stdout.split() == ["cpu", "cpu"]
