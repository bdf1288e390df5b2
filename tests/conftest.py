"""Set before jax is imported anywhere: 8 host CPU devices for sharding tests; XLA:CPU's backend
at LLVM -O0 (the suite's time is mostly compiling tiny programs: -O0 takes a third of it off;
float results can differ from a default build's, so child processes get the same flags, see
tests/processes.py); one compilation cache per test process (the tiny runs compile the same
programs again and again; JAX writes its entries in place, so xdist workers must not share one)."""

import atexit
import os
import shutil
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit them
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or os.environ.get("PYTEST_XDIST_WORKER"):
  _cache = tempfile.mkdtemp(prefix="tailored_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(
      JAX_COMPILATION_CACHE_DIR=_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """The uninterrupted tiny run every resume and fault test compares against: (workdir, records)."""
  from tailored_jax import rounds
  from tests.test_rounds import tiny_config

  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, rounds.run(tiny_config(), workdir)


@pytest.fixture
def paid(monkeypatch):
  """Completions the local teacher served (paid requests, counted at the server)."""
  count = {"n": 0}
  from tailored_jax.teacher import oracle

  real = oracle.reply

  def counting(*args, **kwargs):
    count["n"] += 1
    return real(*args, **kwargs)

  monkeypatch.setattr(oracle, "reply", counting)
  return count


def _allowed_skips() -> dict[str, str]:
  """tests/allowed_skips.txt: `test id prefix  # reason` per line."""
  allowed = {}
  with open(os.path.join(os.path.dirname(__file__), "allowed_skips.txt")) as f:
    for line in f:
      test_id, _, reason = line.partition("#")
      if test_id.strip():
        allowed[test_id.strip()] = reason.strip()
  return allowed


def _ci_refuses(test_id: str, report) -> bool:
  return (
      os.environ.get("CI", "").lower() == "true"
      and report.skipped
      and not hasattr(report, "wasxfail")
      and not any(test_id.startswith(prefix) for prefix in _allowed_skips())
  )


def _fail_the_skip(report) -> None:
  reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
  report.outcome = "failed"
  report.longrepr = (
      f"skipped under CI=true, and tests/allowed_skips.txt does not allow it: {reason}"
  )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Under CI=true a skipped test fails, naming its skip reason, unless allowed_skips.txt lists
  it: a missing compiler, data set or model file must not let CI pass by running less."""
  report = (yield).get_result()
  if _ci_refuses(item.nodeid, report):
    _fail_the_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  """The same for a whole module skipped while collected (`pytest.importorskip`)."""
  report = (yield).get_result()
  if _ci_refuses(report.nodeid, report):
    _fail_the_skip(report)
