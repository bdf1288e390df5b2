"""What a training attention reads besides its own tokens, or keeps of them."""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class KeptKV:
  """Training without a cache, keeping the first `length` tokens' keys and values
  ([batch, kv_heads, length, head_dim]) for rows that continue from them (self-reflection's
  positive and negative reuse the LM forward's prefix, `train.sr_reuse_lm_forward`)."""

  length: int = flax.struct.field(pytree_node=False)
  k_bksh: jax.Array | None = None
  v_bksh: jax.Array | None = None


@flax.struct.dataclass
class ContextKV:
  """Training rows that continue after a read-only context (self-reflection's continuations after
  their prefix): one layer's context keys and values ([groups, kv_heads, slots, head_dim], read
  by groups of consecutive rows) and which of them each new token sees ([batch, new, slots]).
  The rows' own tokens attend causally among themselves; nothing is stored."""

  k_gksh: jax.Array
  v_gksh: jax.Array
  mask_bts: jax.Array
