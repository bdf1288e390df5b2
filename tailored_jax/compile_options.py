"""XLA options for a step, chosen by the devices it compiles for (never by the default backend).

On CPU, XLA's default copy insertion copies every stacked weight a layer scan reads when the
train state is donated (about 0.7 GB for SmolLM2-135M); its region analysis does not. Passed per
compile rather than through XLA_FLAGS, so other backends never see it, and only where this
jaxlib knows the option (an unknown one is an error at compile time, not an abort at start-up).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

CPU_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


@functools.cache
def _known(device, name: str, value) -> bool:
  """Whether this jaxlib's XLA takes option `name` (one tiny compile on `device`)."""
  probe = jax.ShapeDtypeStruct((), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(probe).compile()
    return True
  except jax.errors.JaxRuntimeError as e:
    logging.info("XLA option %s not used: %s", name, e)
    return False


def for_devices(devices) -> dict:
  """The compile options for a step whose arrays live on `devices` (a mesh's device array or
  any iterable of devices)."""
  devices = list(getattr(devices, "flat", devices))
  if not devices or {d.platform for d in devices} != {"cpu"}:
    return {}
  return {name: value for name, value in CPU_OPTIONS.items() if _known(devices[0], name, value)}
