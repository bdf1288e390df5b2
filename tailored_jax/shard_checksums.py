"""Checksums of sharded arrays computed where they live: every element's bits mixed with its
position in the whole array, summed. One jitted computation over a tree: each device sums its
own shard and XLA adds the partial sums (an all-reduce of a few integers), so no array is ever
gathered whole, on any device or host, and the sum is the same for any mesh, sharding or number
of processes (addition mod 2**32 does not depend on order): a checkpoint saved on one mesh
verifies when restored onto another. It runs in the device stream like a train step, so a save
can start it and read the few integers later.

Two independent 32-bit sums (murmur3's finaliser over the element's 32-bit words and their
position) make the 64-bit checksum written as 16 hex digits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_SEEDS = ((0x9E3779B1, 0x85EBCA77), (0xC2B2AE3D, 0x27D4EB2F))


def _mix(x):
  """murmur3's 32-bit finaliser."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(x) -> list:
  """The array's bits as uint32 words of the same shape (two for 8-byte elements)."""
  if x.dtype == jnp.bool_:
    return [x.astype(jnp.uint32)]
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = jnp.dtype(x.dtype).itemsize
  if size == 8:
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    return [halves[..., 0], halves[..., 1]]
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return [jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)]


def _position(shape) -> jax.Array:
  """Each element's position, hashed from its index on every axis (uint32)."""
  h = jnp.zeros(shape, jnp.uint32)
  for axis in range(len(shape)):
    index = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    h = _mix(h * jnp.uint32(0x01000193) + index + jnp.uint32(axis + 1))
  return h


def _leaf_sums(x) -> jax.Array:
  """uint32[2]: the leaf's two hash sums."""
  position = _position(x.shape)
  sums = []
  for a, b in _SEEDS:
    h = jnp.zeros(x.shape, jnp.uint32)
    for word in _words(x):
      h = h + _mix(word * jnp.uint32(a) + position * jnp.uint32(b))
    sums.append(jnp.sum(h, dtype=jnp.uint32))
  return jnp.stack(sums)


@jax.jit
def tree_sums(tree) -> list:
  """Per leaf, uint32[2] on the device (replicated): dispatched, not waited for."""
  return [_leaf_sums(x) for x in jax.tree.leaves(tree)]


def hex64(sums) -> str:
  """A leaf's two sums (`tree_sums`, read from this process's copy) as 16 hex digits."""
  if isinstance(sums, jax.Array):
    sums = sums.addressable_data(0)  # replicated: every process holds the value
  high, low = (int(v) for v in np.asarray(sums))
  return f"{high:08x}{low:08x}"


def host_hex64(array: np.ndarray) -> str:
  """The same checksum of a host array (tests, tools)."""
  return hex64(tree_sums([jnp.asarray(array)])[0])
