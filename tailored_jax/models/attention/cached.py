"""Attention with the KV cache (prefill and decoding): the layer's new keys and values written in
place into its own buffer, then one softmax over its contexts and its own slots, computed as
parts merged by their running maxima and sums (grouped-query; one form on every platform)."""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from tailored_jax.models.attention.masks import NEG_INF


@flax.struct.dataclass
class LayerKV:
  """What one layer's attention reads from and writes to the cache: its own buffers (written in
  place at `index`) and their mask, and its context keys, values and masks."""

  k_bksh: jax.Array
  v_bksh: jax.Array
  index: jax.Array
  mask_bts: jax.Array
  context_k: tuple = ()  # per context: [groups, kv_heads, slots, head_dim]
  context_v: tuple = ()
  context_masks: tuple = ()  # per context: [batch, new, slots]


class Partial(NamedTuple):
  """Softmax attention over part of the keys, to be merged with other parts: running max,
  normaliser and unnormalised output, all float32."""

  max_bkx: jax.Array
  sum_bkx: jax.Array
  out_bkxh: jax.Array


def attend_part(q_bkxh, k_gksh, v_gksh, mask_bxs, dtype, scale: float) -> Partial:
  """Attention of rows [batch, kv_head, x, head_dim] over keys shared by groups of consecutive
  rows (groups = 1: every row; groups = batch: each row its own); x = query-group × new."""
  b, kv_heads, x, h = q_bkxh.shape
  g, s = k_gksh.shape[0], k_gksh.shape[2]
  q_grkxh = q_bkxh.reshape(g, b // g, kv_heads, x, h)
  logits_bkxs = (
      jnp.einsum("grkxh,gksh->grkxs", q_grkxh, k_gksh.astype(dtype))
      .reshape(b, kv_heads, x, s)
      .astype(jnp.float32)
      * scale
  )
  mask_b1xs = mask_bxs[:, None]
  logits_bkxs = jnp.where(mask_b1xs, logits_bkxs, NEG_INF)
  max_bkx = jnp.max(logits_bkxs, axis=-1)
  weights_bkxs = jnp.where(mask_b1xs, jnp.exp(logits_bkxs - max_bkx[..., None]), 0.0)
  out_grkxh = jnp.einsum(
      "grkxs,gksh->grkxh",
      weights_bkxs.reshape(g, b // g, kv_heads, x, s).astype(dtype),
      v_gksh.astype(dtype),
  )
  return Partial(
      max_bkx,
      jnp.sum(weights_bkxs, axis=-1),
      out_grkxh.reshape(b, kv_heads, x, h).astype(jnp.float32),
  )


def merge_parts(a: Partial, b: Partial) -> Partial:
  """The softmax over the union of two parts' keys (online-softmax rescaling)."""
  top_bkx = jnp.maximum(a.max_bkx, b.max_bkx)
  scale_a, scale_b = jnp.exp(a.max_bkx - top_bkx), jnp.exp(b.max_bkx - top_bkx)
  return Partial(
      top_bkx,
      a.sum_bkx * scale_a + b.sum_bkx * scale_b,
      a.out_bkxh * scale_a[..., None] + b.out_bkxh * scale_b[..., None],
  )


def cached_attention(q_btnh, k_btkh, v_btkh, kv: LayerKV, dtype, scale: float | None = None):
  """Writes the new keys/values into the layer's own buffer at `index`, then attends over the
  contexts and the own buffer under one softmax (merged parts; grouped-query: each of the k
  kv-heads serves n/k query heads). Scores in float32. Returns (out_btnh, kv updated)."""
  start = (0, 0, kv.index, 0)
  new_k_bkth = jnp.swapaxes(k_btkh, 1, 2).astype(kv.k_bksh.dtype)
  new_v_bkth = jnp.swapaxes(v_btkh, 1, 2).astype(kv.v_bksh.dtype)
  kv = kv.replace(
      k_bksh=jax.lax.dynamic_update_slice(kv.k_bksh, new_k_bkth, start),
      v_bksh=jax.lax.dynamic_update_slice(kv.v_bksh, new_v_bkth, start),
  )
  b, t, n, h = q_btnh.shape
  kv_heads = kv.k_bksh.shape[1]
  g = n // kv_heads
  scale = h**-0.5 if scale is None else scale
  # queries as [batch, kv_head, group*new, head_dim]: one matmul per (row, kv head)
  q_bkxh = (
      q_btnh.reshape(b, t, kv_heads, g, h)
      .transpose(0, 2, 3, 1, 4)
      .reshape(b, kv_heads, g * t, h)
      .astype(dtype)
  )
  as_bxs = lambda mask_bts: jnp.tile(mask_bts, (1, g, 1))
  result = attend_part(q_bkxh, kv.k_bksh, kv.v_bksh, as_bxs(kv.mask_bts), dtype, scale)
  for k_gksh, v_gksh, mask_bts in zip(kv.context_k, kv.context_v, kv.context_masks):
    result = merge_parts(
        attend_part(q_bkxh, k_gksh, v_gksh, as_bxs(mask_bts), dtype, scale), result
    )
  out_bkxh = result.out_bkxh / jnp.maximum(result.sum_bkx, 1e-30)[..., None]
  out_btnh = out_bkxh.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out_btnh.astype(dtype), kv
