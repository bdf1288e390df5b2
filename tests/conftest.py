"""8 host CPU devices for sharding tests; must run before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """The uninterrupted tiny run every resume and fault test compares against: (workdir, records)."""
  from tailored_jax import rounds
  from tests.test_rounds import tiny_config
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, rounds.run(tiny_config(), workdir)
