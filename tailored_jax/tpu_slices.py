"""TPU slices by topology name (`v5e:4x4`, `v4:2x2x4`, `v5p:2x2x2`, `v6e:2x4`, as libtpu takes
them): each chip's data-sheet figures, and the slice's compile-only devices from libtpu, which
compile a step for a TPU on a machine without one (`plan --topology`).

One JAX device per chip on every generation here (v4 and v5p run their two TensorCores as one
megacore device). Importing this module imports no jax.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A chip's data-sheet figures (Google Cloud TPU documentation, per chip)."""

  hbm_bytes: int
  bf16_tflops: float
  hbm_gb_per_s: float
  accelerator_prefix: str  # TPU_ACCELERATOR_TYPE's name: prefix-<cores or chips>
  cores_per_chip: int  # the accelerator type counts TensorCores on v4/v5p, chips on v5e/v6e
  ici_gb_per_s: float  # inter-chip interconnect per chip, the data sheet's Gbps / 8

  @property
  def megacore(self) -> bool:
    """Two TensorCores run as one device (libtpu's 'megacore' chip configuration)."""
    return self.cores_per_chip == 2


CHIPS = {
    "v4": Chip(32 * GIB, 275.0, 1228.0, "v4", 2, 300.0),
    "v5e": Chip(16 * GIB, 197.0, 819.0, "v5litepod", 1, 200.0),
    "v5p": Chip(95 * GIB, 459.0, 2765.0, "v5p", 2, 600.0),
    "v6e": Chip(32 * GIB, 918.0, 1640.0, "v6e", 1, 448.0),
}
_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


class TopologyError(ValueError):
  """A topology name libtpu would not take, or no libtpu to take it."""


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  generation: str
  dims: tuple[int, ...]

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def accelerator_type(self) -> str:
    return f"{self.chip.accelerator_prefix}-{self.chips * self.chip.cores_per_chip}"


def parse(name: str) -> Slice:
  match = _NAME.match(name)
  if not match:
    raise TopologyError(
        f"topology {name!r}: expected GENERATION:DIMS with a generation of {sorted(CHIPS)} and"
        " chips per axis, e.g. v5e:4x4, v4:2x2x4, v5p:2x2x2"
    )
  return Slice(name, match.group(1), tuple(int(d) for d in match.group(2).split("x")))


def is_topology(name: str) -> bool:
  return bool(_NAME.match(name))


def compile_only_devices(name: str) -> list:
  """The slice's devices as libtpu describes them: jit compiles for them, nothing runs. Sets
  TPU_ACCELERATOR_TYPE (and a worker host name) for libtpu where unset; the process must run
  with JAX_PLATFORMS=cpu when it has no TPU."""
  tpu = parse(name)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  if os.environ.get("JAX_PLATFORMS") == "cpu":  # compile-only: no chip to guard
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another plan's libtpu
  try:
    from jax.experimental import topologies

    description = topologies.get_topology_desc(
        platform="tpu",
        topology_name=name,
        chip_config_name="megacore" if tpu.chip.megacore else "default",
    )
    return list(description.devices)
  except (ImportError, RuntimeError) as e:
    why = str(e).splitlines()[0]
    hint = (
        'install libtpu with pip install "jax[tpu]==<the installed jax version>"'
        if isinstance(e, ImportError) or "libtpu" not in why.lower()
        else "another process holds libtpu; run with JAX_PLATFORMS=cpu to compile only"
    )
    if "INVALID_ARGUMENT" in why:
      hint = "name a slice libtpu lays out (e.g. v5e:2x2, v5e:4x4, v4:2x2x4)"
    raise TopologyError(f"topology {name!r}: libtpu cannot describe it here ({why}); {hint}") from e
