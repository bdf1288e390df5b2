"""The teacher's key from a file (what the pod launcher copies) or the environment."""

import os

import pytest

from tailored_jax.teacher.api_key import read_api_key
from tailored_jax.teacher.client import TeacherError


def test_a_private_key_file_is_read_and_the_environment_is_the_fallback(tmp_path, monkeypatch):
  key_file = tmp_path / "key"
  key_file.write_text("sk-file\n")
  key_file.chmod(0o600)
  monkeypatch.setenv("MY_KEY", "sk-env")
  assert read_api_key(str(key_file), "MY_KEY") == "sk-file"
  assert read_api_key("", "MY_KEY") == "sk-env"
  assert read_api_key("", "NO_SUCH_VARIABLE_HERE") == ""


def test_a_key_file_others_can_read_is_refused_naming_it(tmp_path):
  key_file = tmp_path / "key"
  key_file.write_text("sk-file")
  key_file.chmod(0o644)
  with pytest.raises(TeacherError, match=rf"{key_file} is readable by others \(mode 644\)"):
    read_api_key(str(key_file), "")
  with pytest.raises(TeacherError, match="cannot read .*nowhere: No such file"):
    read_api_key(os.path.join(str(tmp_path), "nowhere"), "")
  empty = tmp_path / "empty"
  empty.write_text("\n")
  empty.chmod(0o600)
  with pytest.raises(TeacherError, match="is empty"):
    read_api_key(str(empty), "")
