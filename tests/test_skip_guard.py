"""Under CI=true a test that skips fails the run with its reason (tests/conftest.py): removing
the C++ compiler or the shared data must not let CI pass by running less."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_run(test_id: str, tmp_path, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", test_id],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, TAILORED_JAX_CACHE=str(tmp_path / "kernel_cache"), **env),
  )


def test_without_a_compiler_ci_fails_naming_the_reason(tmp_path):
  test_id = (
      "tests/test_cpu_attention.py::test_causal_attention_picks_the_kernel_by_config_and_dtype"
  )
  done = pytest_run(test_id, tmp_path, CI="true", CXX="false")
  assert done.returncode == 1, done.stdout
  assert "1 error" in done.stdout
  assert "skipped under CI=true" in done.stdout and "did not build" in done.stdout
  done = pytest_run(test_id, tmp_path, CI="false", CXX="false")  # a developer's run: a skip
  assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout


def test_without_the_shared_data_ci_fails_naming_the_reason(tmp_path):
  done = pytest_run(
      "tests/test_benchmarks.py::test_gsm8k_gold_solutions_score_100_percent",
      tmp_path,
      CI="true",
      TAILORED_JAX_SHARED_DATA=str(tmp_path / "nothing"),
  )
  assert done.returncode == 1 and "1 error" in done.stdout, done.stdout
  assert "benchmark files not found" in done.stdout
