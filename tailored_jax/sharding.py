"""The device mesh from config and the logical-axis rules that place parameters and activations.

Models name axes logically (embed, heads, mlp, vocab, batch…); `RULES` maps each to mesh axes.
Parameters shard `embed` over fsdp (ZeRO-3 style) and heads/mlp/vocab over tensor; activations
shard `batch` over data and fsdp.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tailored_jax.config_lib import DECODE_LAYOUTS, mesh_preset

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # what a training batch's rows are split over

RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("layers", None),
    ("act_embed", None),
)


@contextlib.contextmanager
def activation_layout(mesh: Mesh):
  """Within: the models' activation constraints (`annotations.constrain`) apply by `RULES` on `mesh`
  (rows over data × fsdp, heads/MLP/vocabulary over tensor, the residual stream whole), so
  the partitioner gathers FSDP weights instead of splitting the contraction of activations."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
    yield


def mesh_shape(cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) from `cfg.mesh` (or its preset); one size may be -1:
  whatever is left."""
  preset = cfg.mesh.get("preset", "")
  if preset:
    devices, _, sizes = mesh_preset(preset)
    if devices != num_devices:
      raise ValueError(
          f"config field mesh.preset: {preset!r} is a slice of {devices} devices, "
          f"this run has {num_devices}"
      )
    return tuple(sizes)
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"config field mesh: at most one axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config field mesh: sizes must be positive or -1, got {sizes}")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config field mesh: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config field mesh: {dict(zip(MESH_AXES, sizes))} needs "
        f"{math.prod(sizes)} devices, have {num_devices}"
    )
  return tuple(sizes)


def make_mesh(cfg, devices=None) -> Mesh:
  if devices is None:
    devices = jax.devices()
    if cfg.mesh.num_devices:
      if cfg.mesh.num_devices > len(devices):
        raise ValueError(
            f"config field mesh.num_devices: {cfg.mesh.num_devices} devices asked, "
            f"{len(devices)} present"
        )
      devices = devices[: cfg.mesh.num_devices]
  shape = mesh_shape(cfg, len(devices))
  return Mesh(
      np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
  )


def logical_sharding(tree, mesh: Mesh):
  """NamedShardings for a tree of logically partitioned (boxed) leaves, by `RULES`."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


# The dims a decode layout splits, in groups that must split alike (a query head and its kv
# head on the same device; the MLP's three matrices; the vocabulary rows of embedding and head).
MODEL_AXIS_GROUPS = (("heads", "kv_heads"), ("mlp",), ("vocab",))


def decode_model_axes(layout: str, mesh: Mesh, sizes) -> tuple[str, ...] | None:
  """The mesh axes a decode layout splits one group of model dims over (all of `sizes` must
  divide): under 'model_parallel' tensor × fsdp, else tensor, else fsdp; None: whole."""
  if layout != "model_parallel":
    return None
  for axes in (("tensor", "fsdp"), ("tensor",), ("fsdp",)):
    split = math.prod(mesh.shape[a] for a in axes)
    if split > 1 and all(size % split == 0 for size in sizes):
      return axes
  return None


def decode_head_axes(layout: str, mesh: Mesh, cfg) -> tuple[str, ...] | None:
  """The mesh axes a decode layout splits the attention heads (and so the KV cache) over."""
  return decode_model_axes(layout, mesh, {cfg.n_heads, cfg.n_kv_heads})


def decode_slot_shardings(tree, mesh: Mesh, slots: int, row_axes, head_axes):
  """Shardings for continuous batching's slots (`sample.continuous.Slots`): arrays led by the
  slot axis split over `row_axes`; keys and values ([rows or groups, kv_heads, positions,
  head_dim]) also over `head_axes`, as the weights that write them are, so a model-parallel
  layout holds 1/N of the cache per device; anything else whole."""

  def place(leaf):
    if leaf.ndim == 0:
      return replicated(mesh)
    rows = (tuple(row_axes) or None) if leaf.shape[0] == slots else None
    rest = [None] * (leaf.ndim - 1)
    if leaf.ndim == 4:
      rest[0] = head_axes
    return NamedSharding(mesh, PartitionSpec(rows, *rest))

  return jax.tree.map(place, tree)


def decode_shardings(specs, abstract_params, mesh: Mesh, layout: str):
  """Parameter shardings for decoding, where an FSDP layout would all-gather every weight at
  every token. 'model_parallel': heads/mlp/vocab dims split over tensor and fsdp (or the one of
  them that divides every dim of the group; Megatron-style, activations all-reduced instead)
  and the embed dim whole; 'replicated': every weight whole on every device; 'train': the
  training layout unchanged. `specs` are the logical PartitionSpecs (`nn.get_partition_spec`)."""
  if layout == "train":
    return nn.logical_to_mesh_sharding(specs, mesh, RULES)
  if layout not in DECODE_LAYOUTS:
    raise ValueError(
        f"config field mesh.decode_layout: {layout!r} is not one of {list(DECODE_LAYOUTS)}"
    )
  is_spec = lambda x: isinstance(x, PartitionSpec)
  sizes: dict[str, set[int]] = {}
  for spec, abstract in zip(
      jax.tree.leaves(specs, is_leaf=is_spec), jax.tree.leaves(abstract_params)
  ):
    for name, size in zip(spec, abstract.shape):
      sizes.setdefault(name, set()).add(size)
  axes_for: dict[str, tuple[str, ...] | None] = {}
  for group in MODEL_AXIS_GROUPS:
    group_sizes = set().union(*(sizes.get(name, set()) for name in group))
    choice = decode_model_axes(layout, mesh, group_sizes)
    axes_for.update({name: choice for name in group})
  return jax.tree.map(
      lambda spec, _: NamedSharding(mesh, PartitionSpec(*(axes_for.get(n) for n in spec))),
      specs,
      abstract_params,
      is_leaf=is_spec,
  )


def decode_row_axes(layout: str, param_shardings=None) -> tuple[str, ...]:
  """The mesh axes decode rows are split over: data and fsdp (the 'train' layout gathers the
  weights per token; 'replicated' holds them whole), or under 'model_parallel' every mesh axis
  that no weight in `param_shardings` is split over: the devices along an axis that splits a
  weight all-reduce partial outputs, so they must hold the same rows, but along any other axis
  they can decode different ones (with heads that no axis divides, the weights are whole and
  every device decodes its own rows)."""
  if layout != "model_parallel":
    return BATCH_AXES
  used = set()
  for placed in jax.tree.leaves(param_shardings):
    for entry in getattr(placed, "spec", ()):  # a single device's sharding splits nothing
      used.update(entry if isinstance(entry, tuple) else (entry,))
  return tuple(axis for axis in MESH_AXES if axis not in used)


def decode_batch_sharding(mesh: Mesh, ndim: int, row_axes: tuple[str, ...]) -> NamedSharding:
  """Arrays whose leading axis is decode rows, split over `row_axes` (`decode_row_axes`)."""
  return NamedSharding(mesh, PartitionSpec(tuple(row_axes) or None, *([None] * (ndim - 1))))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Arrays whose leading axis is the batch: split over data and fsdp, replicated otherwise."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_global(array, target: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full (our batches are built
  identically on every host); each process hands over only the shards it addresses."""
  return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
  """The whole value of a (possibly multi-host) global array, on every host."""
  if jax.process_count() == 1 or array.is_fully_addressable:
    return np.asarray(array)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def barrier(name: str) -> None:
  """Waits for every process (a no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def smallest(value: int) -> int:
  """The smallest of every process's `value`, on every process: for choices each process
  would otherwise make from its own machine (free memory, a kernel that builds), which must be
  the same everywhere, or the processes trace different programs and hang in a collective."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  # as two 31-bit halves: without jax_enable_x64 an int64 travels as int32 and wraps (80 GB of
  # device memory arrived negative)
  halves = np.asarray([value >> 31, value & 0x7FFFFFFF], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves)).reshape(-1, 2)
  return min((int(high) << 31) | int(low) for high, low in gathered)


def agree(flag: bool) -> bool:
  """Process 0's value of `flag`, on every process (the value itself in a single process)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
