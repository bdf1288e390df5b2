"""8 host CPU devices for sharding tests, and one compilation cache for the session (the tiny
runs compile the same programs again and again: each run builds its own jitted steps); must run
before jax is imported anywhere."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="tailored_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """The uninterrupted tiny run every resume and fault test compares against: (workdir, records)."""
  from tailored_jax import rounds
  from tests.test_rounds import tiny_config
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, rounds.run(tiny_config(), workdir)
