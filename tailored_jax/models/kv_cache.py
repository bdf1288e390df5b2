"""The KV cache: one fixed-size buffer shared by generation and the self-reflection prefix.

New tokens are written at `index`: one slot for every row (static batches: prompts left-padded)
or a slot per row (continuous batching: each row at its own step, `write_at`); `valid_bs`
marks which buffer slots hold real tokens, so padding is masked everywhere. `context` holds keys
and values that groups of rows read but never write, stored once per group: a task's few-shot
prefix (one group: every row) and each prompt's own tokens (a group: its k samples). The
attention that reads and writes it is in `attention/cached.py`. Keys and values are kept in
`cache_dtype`; int8 stores them as an `Int8Buffer` (a scale per token and kv head).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Int8Buffer:
  """Keys or values as int8 with a float32 scale per (row, kv head, slot): each token's largest
  magnitude over head_dim maps to 127 (symmetric). 1 + 4/head_dim bytes an element, against 4
  for float32; attention applies the scales to its scores and weights (`attention/cached.py`)."""

  q: jax.Array  # int8 [..., slots, head_dim]
  scale: jax.Array  # float32 [..., slots, 1]

  @property
  def shape(self) -> tuple[int, ...]:
    return self.q.shape

  @property
  def dtype(self):
    return self.q.dtype


def quantize_int8(x) -> Int8Buffer:
  """`x` [..., head_dim] as int8 with one scale per vector (its absolute maximum / 127)."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
  q = jnp.clip(jnp.round(x / jnp.where(scale > 0, scale, 1.0)), -127, 127)
  return Int8Buffer(q.astype(jnp.int8), scale)


def dequantize(buffer) -> jax.Array:
  """A buffer's keys or values as float32 (an `Int8Buffer`) or as stored."""
  if isinstance(buffer, Int8Buffer):
    return buffer.q.astype(jnp.float32) * buffer.scale
  return buffer


def buffer_zeros(shape: tuple[int, ...], dtype):
  """An empty key or value buffer of `shape` [..., slots, head_dim] kept in `dtype`."""
  if jnp.dtype(dtype) == jnp.int8:
    return Int8Buffer(jnp.zeros(shape, jnp.int8), jnp.zeros((*shape[:-1], 1), jnp.float32))
  return jnp.zeros(shape, dtype)


@flax.struct.dataclass
class Context:
  """Keys and values read by `rows / groups` consecutive rows per group; `positions_gs` are the
  tokens' positions (-1: padding, never seen). Every context token precedes the rows' own."""

  keys: tuple  # per layer: [groups, kv_heads, slots, head_dim] (stacked when layers scan)
  values: tuple
  positions_gs: jax.Array  # int32 [groups, slots]

  @property
  def length(self) -> int:
    return self.keys[0].shape[2]


@flax.struct.dataclass
class KVCache:
  """Per layer, [batch, kv_heads, slots, head_dim] buffers: the layout attention's batched matmuls
  read without a transpose, one array per layer so that a step reads and updates a layer's buffer
  in place (slicing a stacked buffer makes XLA:CPU copy it every step). A scanned model (in
  training only: its self-reflection prefix) reads one stacked [layers, ...] array instead."""

  keys: tuple | jax.Array
  values: tuple | jax.Array
  valid_bs: jax.Array  # [batch, slots] bool
  index: jax.Array  # int32: the next slot to write, a scalar or one per row [batch]
  context: tuple[Context, ...] = ()  # read before the rows' own slots

  @classmethod
  def zeros(
      cls,
      layers: int,
      batch: int,
      slots: int,
      kv_heads: int,
      head_dim: int,
      dtype,
      context: tuple[Context, ...] = (),
      stacked: bool = False,
  ) -> "KVCache":
    shape = (batch, kv_heads, slots, head_dim)
    if stacked:
      keys, values = buffer_zeros((layers, *shape), dtype), buffer_zeros((layers, *shape), dtype)
    else:
      keys = tuple(buffer_zeros(shape, dtype) for _ in range(layers))
      values = tuple(buffer_zeros(shape, dtype) for _ in range(layers))
    return cls(keys, values, jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32), context)

  @property
  def slots(self) -> int:
    return self.valid_bs.shape[1]

  def repeat(self, times: int) -> "KVCache":
    """Each row repeated `times` times in place (row b -> rows b*times..), e.g. k exam samples."""
    repeat = lambda buffer: jax.tree.map(lambda a: jnp.repeat(a, times, axis=0), buffer)
    return self.replace(
        keys=tuple(repeat(k) for k in self.keys),
        values=tuple(repeat(v) for v in self.values),
        valid_bs=jnp.repeat(self.valid_bs, times, axis=0),
    )

  def as_context(self, positions_bs: jax.Array) -> Context:
    """The filled buffer as a context with one group per row (positions_bs: -1 where invalid)."""
    return Context(
        self.keys, self.values, jnp.where(self.valid_bs, positions_bs, -1).astype(jnp.int32)
    )


def cache_dtype(cfg) -> jnp.dtype:
  """The dtype decoding keeps keys and values in: `kv_cache_dtype`, else the compute dtype."""
  return jnp.dtype(cfg.kv_cache_dtype or cfg.dtype)


def cache_bytes_per_element(cfg) -> float:
  """Bytes one key or value element takes in the cache, an int8 buffer's scales included."""
  dtype = cache_dtype(cfg)
  return 1 + 4 / cfg.head_dim if dtype == jnp.int8 else dtype.itemsize


def write_at(buffer, new, index, axis: int):
  """`new` written into `buffer` (an array, or an `Int8Buffer` that `new` is quantized for) from
  slot `index` along `axis` (>= 1; axis 0 is the rows): one slice for a scalar index, each row at
  its own for an index per row."""
  new = quantize_int8(new) if isinstance(buffer, Int8Buffer) else new.astype(buffer.dtype)
  if jnp.ndim(index) == 0:
    write = lambda b, n: jax.lax.dynamic_update_slice_in_dim(b, n, index, axis=axis)
  else:
    row = lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis=axis - 1)
    write = lambda b, n: jax.vmap(row)(b, n, index)
  return jax.tree.map(write, buffer, new)
