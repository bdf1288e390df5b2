"""Which keys each query sees: over the decode cache's slots, and over a read-only context."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def attention_mask(
    valid_bs: jax.Array, index: jax.Array, num_new: int, window: int = 0
) -> jax.Array:
  """[batch, new, slots]: a new token at slot index+t sees valid slots up to and including itself
  (and, with a sliding `window`, only the last `window` slots; real tokens are contiguous).
  `index`: a scalar, or each row's own [batch]."""
  slots = valid_bs.shape[1]
  query_slot_bt = jnp.reshape(index, (-1, 1)) + jnp.arange(num_new)[None, :]
  key_slot_s = jnp.arange(slots)
  causal_bts = key_slot_s <= query_slot_bt[:, :, None]
  if window:
    causal_bts &= key_slot_s > query_slot_bt[:, :, None] - window
  return valid_bs[:, None, :] & causal_bts


def context_mask(positions_gs: jax.Array, positions_bt: jax.Array, window: int = 0) -> jax.Array:
  """[batch, new, slots]: which context tokens each new token sees: the real ones (position
  >= 0) of its row's group, or with a sliding `window` those within it. Groups are consecutive
  rows (batch / groups per group)."""
  b, g = positions_bt.shape[0], positions_gs.shape[0]
  positions_bs = jnp.repeat(positions_gs, b // g, axis=0)
  seen_bts = jnp.broadcast_to(
      (positions_bs >= 0)[:, None, :], (b, positions_bt.shape[1], positions_bs.shape[1])
  )
  if window:
    seen_bts &= positions_bs[:, None, :] > positions_bt[:, :, None] - window
  return seen_bts
