"""The environment of a test's child processes: the test session's XLA flags (the same
optimisation level, so float results match the parent's) without its 8 forced host devices."""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags_without_device_count() -> str:
  return " ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)
  )


def child_env(**overrides: str) -> dict[str, str]:
  """os.environ for a child run on the CPU, its XLA flags without the device count."""
  return dict(
      os.environ, XLA_FLAGS=xla_flags_without_device_count(), JAX_PLATFORMS="cpu", **overrides
  )
