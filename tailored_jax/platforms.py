"""Which JAX platforms a run starts, before any backend: libtpu on a host without a TPU (it comes
with the test extra, for compiling TPU plans) would otherwise be initialised by every run, print
its start-up errors and map its 700 MB library, then fall back to the CPU."""

from __future__ import annotations

import importlib.util
import os


def skip_absent_tpu() -> None:
  """With no platform chosen (JAX_PLATFORMS), libtpu installed and no TPU chip on this host,
  start GPU or CPU backends only. Call before the first device is asked for."""
  import jax

  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  try:
    from jax._src import hardware_utils

    chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except (ImportError, AttributeError, OSError):
    return
  if chips == 0:
    jax.config.update("jax_platforms", "cuda,cpu")  # 'cuda' without its plugin: skipped
