"""The teacher's API key: from a file (`teacher.api_key_file`, what a pod launcher copies to the
worker that calls the teacher) or an environment variable (`teacher.api_key_env`). Never put on
a command line, in a log or in the workdir."""

from __future__ import annotations

import os
import stat

from tailored_jax.teacher.client import TeacherError


def read_api_key(key_file: str, env_var: str) -> str:
  """The key, or '' where neither gives one. A key file others may read is refused, naming the
  file and its mode."""
  if not key_file:
    return os.environ.get(env_var, "")
  path = os.path.expanduser(key_file)
  try:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
      raise TeacherError(
          f"config field teacher.api_key_file: {path} is readable by others (mode {mode:o}); "
          f"chmod 600 {path}"
      )
    with open(path) as f:
      key = f.read().strip()
  except OSError as e:
    raise TeacherError(f"config field teacher.api_key_file: cannot read {path}: {e.strerror}")
  if not key:
    raise TeacherError(f"config field teacher.api_key_file: {path} is empty")
  return key
