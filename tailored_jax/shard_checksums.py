"""Checksums of sharded arrays that never gather one: each process sums a position-keyed hash
of every element of the shards it holds (one replica of each), and the per-array sums add up
across processes (a few integers exchanged). The sum is the same for any mesh, any sharding and
any number of processes, so a checkpoint saved on one mesh verifies when restored onto another.

Element hash: the element's bits and its linear index in the whole array, mixed (xor-shift
multiply) to 64 bits; the array's checksum is their sum mod 2**64. Host memory: a bounded chunk
of one shard at a time.
"""

from __future__ import annotations

import numpy as np

CHUNK_ELEMENTS = 1 << 20  # elements hashed at once
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _hash_sum(bits: np.ndarray, linear_index: np.ndarray) -> int:
  x = bits.astype(np.uint64) + linear_index.astype(np.uint64) * _MULTIPLIER
  x ^= x >> np.uint64(29)
  x *= _MIX
  x ^= x >> np.uint64(32)
  return int(np.sum(x, dtype=np.uint64))


def block_sum(block: np.ndarray, starts: tuple[int, ...], shape: tuple[int, ...]) -> int:
  """The hash sum of `block`, which sits at `starts` in an array of `shape`."""
  block = np.ascontiguousarray(block).reshape(np.shape(block))  # (it makes a scalar 1-d)
  if block.dtype == bool:
    block = block.astype(np.uint8)
  bits = block.view(_UINT[block.dtype.itemsize])
  strides = np.cumprod((1,) + tuple(reversed(shape[1:])))[::-1].astype(np.int64)
  if block.ndim == 0:
    return _hash_sum(bits.reshape(1), np.zeros(1, np.int64))
  total = 0
  rows = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(block.shape[1:]))))
  inner = np.zeros(block.shape[1:], np.int64)
  for d in range(1, block.ndim):
    axis = (np.arange(block.shape[d]) + starts[d]) * strides[d]
    inner = inner + axis.reshape((-1,) + (1,) * (block.ndim - 1 - d))
  for r0 in range(0, block.shape[0], rows):
    r1 = min(r0 + rows, block.shape[0])
    row_offsets = (np.arange(r0, r1) + starts[0]) * strides[0]
    index = row_offsets.reshape((-1,) + (1,) * (block.ndim - 1)) + inner
    total += _hash_sum(bits[r0:r1], index)
  return total % (1 << 64)


def local_sum(array) -> int:
  """This process's part of `array`'s checksum: the shards it holds whose replica id is 0
  (numpy arrays: the whole array)."""
  shape = tuple(array.shape)
  if isinstance(array, np.ndarray) or not hasattr(array, "addressable_shards"):
    return block_sum(np.asarray(array), (0,) * len(shape), shape)
  total = 0
  for shard in array.addressable_shards:
    if shard.replica_id != 0:
      continue
    starts = tuple(s.indices(n)[0] for s, n in zip(shard.index, shape))
    total += block_sum(np.asarray(shard.data), starts, shape)
  return total % (1 << 64)


def combine(parts: np.ndarray) -> list[int]:
  """Per array, the sum mod 2**64 of every process's part; `parts` is [processes, arrays, 2]
  uint32 halves (high, low)."""
  parts = np.asarray(parts, np.uint64).reshape(-1, parts.shape[-2], 2)
  return [
      sum((int(hi) << 32) | int(lo) for hi, lo in parts[:, i]) % (1 << 64)
      for i in range(parts.shape[1])
  ]


def halves(values: list[int]) -> np.ndarray:
  """[arrays, 2] uint32 (high, low) of 64-bit values: what processes exchange (no 64-bit
  integers needed on the devices)."""
  return np.asarray([[v >> 32, v & 0xFFFFFFFF] for v in values], np.uint32).reshape(-1, 2)
