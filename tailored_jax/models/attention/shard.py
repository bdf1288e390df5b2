"""Running an attention kernel per device: XLA cannot split a custom call (a native CPU kernel,
a Pallas TPU kernel) itself, so under the trace's mesh each device runs its own rows and heads
inside a `shard_map`, as the activations lie (`sharding.RULES`: rows over data × fsdp, heads
over tensor)."""

from __future__ import annotations

import jax
import numpy as np


def split_axes(mesh, rows: int, groups: int, heads: int, kv_heads: int):
  """(rows' mesh axes, heads' mesh axis) a kernel runs split over; None where they do not
  divide (the rows, or a context's groups of them; the query or key/value heads)."""
  size = lambda name: mesh.shape.get(name, 1)
  row_axes = tuple(a for a in ("data", "fsdp") if size(a) > 1)
  row_shards = int(np.prod([size(a) for a in row_axes])) if row_axes else 1
  tensor = size("tensor")
  return (
      row_axes if row_axes and rows % row_shards == 0 and groups % row_shards == 0 else None,
      "tensor" if tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0 else None,
  )


def trace_mesh():
  """The mesh the step is traced under (`sharding.activation_layout`), or None without one or
  with a single device."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def per_device(kernel, mesh, in_specs: tuple, out_specs):
  """`kernel` on each device's shards (`PartitionSpec`s in the rows/heads axes of
  `split_axes`)."""
  return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def local_rows_and_heads(rows: int, heads: int) -> tuple[int, int]:
  """Rows and heads per device under the trace's mesh; the whole arrays without one."""
  mesh = jax.sharding.get_abstract_mesh()
  size = lambda name: mesh.shape.get(name, 1) if not mesh.empty else 1
  row_shards, tensor = size("data") * size("fsdp"), size("tensor")
  local_rows = rows // row_shards if rows % row_shards == 0 else rows
  return local_rows, max(heads // tensor, 1)
