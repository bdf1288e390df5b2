"""The house style (pyproject.toml [tool.pyink], [tool.ruff]) holds for every Python file."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["tailored_jax", "tests", "configs"]


def test_code_is_formatted():
  result = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--diff", *PATHS],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, f"run `pyink {' '.join(PATHS)}`:\n{result.stdout[-3000:]}"


def test_code_passes_the_linter():
  result = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--output-format=concise", *PATHS],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
