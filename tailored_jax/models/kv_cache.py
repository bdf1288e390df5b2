"""The KV cache: one fixed-size buffer shared by generation and the self-reflection prefix.

New tokens are written at `index`: one slot for every row (static batches: prompts left-padded)
or a slot per row (continuous batching: each row at its own step, `write_at`); `valid_bs`
marks which buffer slots hold real tokens, so padding is masked everywhere. `context` holds keys
and values that groups of rows read but never write, stored once per group: a task's few-shot
prefix (one group: every row) and each prompt's own tokens (a group: its k samples). The
attention that reads and writes it is in `layers.py`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


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
      keys, values = jnp.zeros((layers, *shape), dtype), jnp.zeros((layers, *shape), dtype)
    else:
      keys = tuple(jnp.zeros(shape, dtype) for _ in range(layers))
      values = tuple(jnp.zeros(shape, dtype) for _ in range(layers))
    return cls(keys, values, jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32), context)

  @property
  def slots(self) -> int:
    return self.valid_bs.shape[1]

  def repeat(self, times: int) -> "KVCache":
    """Each row repeated `times` times in place (row b -> rows b*times..), e.g. k exam samples."""
    return self.replace(
        keys=tuple(jnp.repeat(k, times, axis=0) for k in self.keys),
        values=tuple(jnp.repeat(v, times, axis=0) for v in self.values),
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


def write_at(buffer, new, index, axis: int):
  """`new` written into `buffer` from slot `index` along `axis` (>= 1; axis 0 is the rows): one
  slice for a scalar index, each row at its own for an index per row."""
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(buffer, new, index, axis=axis)
  row = lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis=axis - 1)
  return jax.vmap(row)(buffer, new.astype(buffer.dtype), index)
