"""The environment of a test's child processes: the test session's XLA flags (the same
optimisation level, so float results match the parent's) without its 8 forced host devices."""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def child_env(host_devices: int = 0, **overrides: str) -> dict[str, str]:
  """os.environ for a child run on the CPU: its XLA flags without the session's device count,
  with `host_devices` forced instead where given."""
  flags = [
      f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)
  ]
  if host_devices:
    flags.append(f"{DEVICE_COUNT_FLAG}={host_devices}")
  return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", **overrides}
