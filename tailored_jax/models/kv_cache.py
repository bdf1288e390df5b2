"""The KV cache: one fixed-size buffer shared by generation and the self-reflection prefix.

New tokens are written at `index` (the same for every row: prompts are left-padded); `valid_bs`
marks which buffer slots hold real tokens, so padding is masked everywhere. An optional
`SharedPrefix` holds the keys and values of a prefix every row starts with (a task's few-shot
demos), stored once rather than per row. The attention that reads and writes it is in `layers.py`.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SharedPrefix:
  """Keys and values of the tokens every row starts with, at positions 0..length-1."""
  k_lkph: jax.Array  # [layers, kv_heads, prefix, head_dim]
  v_lkph: jax.Array

  @property
  def length(self) -> int:
    return self.k_lkph.shape[2]


@flax.struct.dataclass
class KVCache:
  # [layers, batch, kv_heads, slots, head_dim]: the layout attention's batched matmuls read
  # without a transpose (batch and head leading, slots then head_dim)
  k_lbksh: jax.Array
  v_lbksh: jax.Array
  valid_bs: jax.Array  # [batch, slots] bool
  index: jax.Array  # int32 scalar: the next slot to write
  prefix: SharedPrefix | None = None  # seen by every row before its own slots

  @classmethod
  def zeros(cls, layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype,
            prefix: SharedPrefix | None = None) -> "KVCache":
    shape = (layers, batch, kv_heads, slots, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, slots), bool),
               jnp.zeros((), jnp.int32), prefix)

  @property
  def prefix_length(self) -> int:
    return 0 if self.prefix is None else self.prefix.length

  @property
  def slots(self) -> int:
    return self.valid_bs.shape[1]

  def repeat(self, times: int) -> "KVCache":
    """Each row repeated `times` times in place (row b -> rows b*times..), e.g. k exam samples."""
    return KVCache(jnp.repeat(self.k_lbksh, times, axis=1), jnp.repeat(self.v_lbksh, times, axis=1),
                   jnp.repeat(self.valid_bs, times, axis=0), self.index, self.prefix)

  def shared(self) -> SharedPrefix:
    """Row 0's filled slots as a prefix for other caches (its prompt had no padding)."""
    return SharedPrefix(self.k_lbksh[:, 0], self.v_lbksh[:, 0])
