"""Attention with the KV cache (prefill and decoding): the layer's new keys and values written in
place into its own buffer, then one softmax over its contexts and its own slots, computed as
parts merged by their running maxima and sums (grouped-query; one form on every platform, but
for a one-token step on one CPU device, which reads a row's own keys with the native kernel,
`cpu_decode`)."""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from tailored_jax.models.attention import cpu_decode
from tailored_jax.models.attention.masks import NEG_INF
from tailored_jax.models.kv_cache import Int8Buffer, write_at


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
  rows (groups = 1: every row; groups = batch: each row its own); x = query-group × new.

  Both products are batched over (group, kv head) with the group's rows stacked as the matmul's
  M dimension and the keys and values read in their stored [slots, head_dim] order: the forms
  XLA:CPU hands to its GEMM library without transposing the cache (an einsum over
  [group, row, kv_head, x] left it to a slower batched dot with the values transposed, 2x the
  time of the decode step's attention)."""
  b, kv_heads, x, h = q_bkxh.shape
  g, s = k_gksh.shape[0], k_gksh.shape[2]
  r = b // g
  q_gkmh = (
      q_bkxh.reshape(g, r, kv_heads, x, h)
      .transpose(0, 2, 1, 3, 4)
      .reshape(g, kv_heads, r * x, h)
      .astype(dtype)
  )
  batched = ((0, 1), (0, 1))  # group, kv head: kept apart, since kv heads may be sharded
  k_gksh, k_scale_gk11s = _stored_as(k_gksh, dtype)
  v_gksh, v_scale_gk11s = _stored_as(v_gksh, dtype)
  logits_gkms = jax.lax.dot_general(q_gkmh, k_gksh, (((3,), (3,)), batched))
  logits_gkrxs = logits_gkms.reshape(g, kv_heads, r, x, s).astype(jnp.float32) * scale
  if k_scale_gk11s is not None:
    logits_gkrxs = logits_gkrxs * k_scale_gk11s
  mask_g1rxs = mask_bxs.reshape(g, 1, r, x, s)
  logits_gkrxs = jnp.where(mask_g1rxs, logits_gkrxs, NEG_INF)
  max_gkrx = jnp.max(logits_gkrxs, axis=-1)
  weights_gkrxs = jnp.where(mask_g1rxs, jnp.exp(logits_gkrxs - max_gkrx[..., None]), 0.0)
  value_weights_gkrxs = weights_gkrxs if v_scale_gk11s is None else weights_gkrxs * v_scale_gk11s
  out_gkmh = jax.lax.dot_general(
      value_weights_gkrxs.reshape(g, kv_heads, r * x, s).astype(dtype),
      v_gksh,
      (((3,), (2,)), batched),
  )
  as_rows = lambda a: jnp.swapaxes(a, 1, 2).reshape(b, kv_heads, *a.shape[3:])
  return Partial(
      as_rows(max_gkrx),
      as_rows(jnp.sum(weights_gkrxs, axis=-1)),
      as_rows(out_gkmh.reshape(g, kv_heads, r, x, h).astype(jnp.float32)),
  )


def _stored_as(buffer_gksh, dtype) -> tuple[jax.Array, jax.Array | None]:
  """A context's or buffer's keys or values as `dtype` for the matmul, and for an `Int8Buffer`
  its scales as [groups, kv_heads, 1, 1, slots]: a key's scale multiplies its scores and a
  value's its softmax weights (s numbers a row, not s × head_dim)."""
  if not isinstance(buffer_gksh, Int8Buffer):
    return buffer_gksh.astype(dtype), None
  g, k, s, _ = buffer_gksh.shape
  return buffer_gksh.q.astype(dtype), buffer_gksh.scale.reshape(g, k, 1, 1, s)


def merge_parts(a: Partial, b: Partial) -> Partial:
  """The softmax over the union of two parts' keys (online-softmax rescaling)."""
  top_bkx = jnp.maximum(a.max_bkx, b.max_bkx)
  scale_a, scale_b = jnp.exp(a.max_bkx - top_bkx), jnp.exp(b.max_bkx - top_bkx)
  return Partial(
      top_bkx,
      a.sum_bkx * scale_a + b.sum_bkx * scale_b,
      a.out_bkxh * scale_a[..., None] + b.out_bkxh * scale_b[..., None],
  )


FILLED_CHUNK = 32  # slots of a decode step's buffers read per iteration


def attend_span(q_bkxh, k_gksh, v_gksh, mask_bxs, lo, hi, dtype, scale: float) -> Partial:
  """`attend_part` over buffers of which only slots [lo, hi) can be valid for any row, read in
  `FILLED_CHUNK`-slot chunks from the one holding `lo` to the one holding `hi - 1`: a decode step
  reads the tokens generated so far, not the whole budget's buffer (at step 40 of 256, a sixth
  of it), and of the prompts' buffers only the chunks some row's prompt reaches. Chunks are cut
  at multiples of `FILLED_CHUNK` from slot 0 (buffers of a multiple of it: prompts right-aligned
  in them fall into the same chunks whatever the buffer's length, so a row gets the same sums);
  other buffers are read whole. Forward only (its loop has traced bounds): one-token steps."""
  slots = k_gksh.shape[2]
  if slots < 2 * FILLED_CHUNK or slots % FILLED_CHUNK:
    return attend_part(q_bkxh, k_gksh, v_gksh, mask_bxs, dtype, scale)
  b, kv_heads, x, h = q_bkxh.shape

  def chunk(c, result: Partial) -> Partial:
    cut = lambda buffer: jax.tree.map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, c * FILLED_CHUNK, FILLED_CHUNK, axis=2), buffer
    )
    part = attend_part(q_bkxh, cut(k_gksh), cut(v_gksh), cut(mask_bxs), dtype, scale)
    return merge_parts(result, part)

  empty = Partial(
      jnp.full((b, kv_heads, x), NEG_INF, jnp.float32),
      jnp.zeros((b, kv_heads, x), jnp.float32),
      jnp.zeros((b, kv_heads, x, h), jnp.float32),
  )
  first = jnp.clip(lo, 0, slots) // FILLED_CHUNK
  last = (jnp.clip(hi, 0, slots) + FILLED_CHUNK - 1) // FILLED_CHUNK
  return jax.lax.fori_loop(first, last, chunk, empty)


def first_seen(mask_bts) -> jax.Array:
  """The first slot any row's new tokens see (the slot count when none sees any)."""
  slots = mask_bts.shape[-1]
  seen_bs = jnp.any(mask_bts, axis=1)
  return jnp.min(jnp.where(jnp.any(seen_bs, axis=1), jnp.argmax(seen_bs, axis=1), slots))


def decode_part(q_bkxh, k_gksh, v_gksh, mask_bts, lo, hi, dtype, scale: float, native: bool):
  """A one-token step's softmax part over one context or its own buffer: with `native`, the native
  kernel where it takes the inputs (`cpu_decode.usable`: a row's own buffer or prompt, a
  prompt's k samples), else `attend_span` over the slots [lo, hi) can hold (a prefix every row
  reads is one matmul over all rows there)."""
  if native and cpu_decode.usable(q_bkxh, k_gksh):
    return Partial(*cpu_decode.part(q_bkxh, k_gksh, v_gksh, mask_bts[:, 0], scale))
  g = q_bkxh.shape[2] // mask_bts.shape[1]
  return attend_span(q_bkxh, k_gksh, v_gksh, jnp.tile(mask_bts, (1, g, 1)), lo, hi, dtype, scale)


def cached_attention(
    q_btnh, k_btkh, v_btkh, kv: LayerKV, dtype, scale: float | None = None, native: bool = False
):
  """Writes the new keys/values into the layer's own buffer at `index`, then attends over the
  contexts and the own buffer under one softmax (merged parts; grouped-query: each of the k
  kv-heads serves n/k query heads). Scores in float32. With `native` (one CPU device:
  `dispatch.native_decode`), a one-token step reads the cache with the native kernel. Returns
  (out_btnh, kv updated)."""
  kv = kv.replace(
      k_bksh=write_at(kv.k_bksh, jnp.swapaxes(k_btkh, 1, 2), kv.index, axis=2),
      v_bksh=write_at(kv.v_bksh, jnp.swapaxes(v_btkh, 1, 2), kv.index, axis=2),
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
  if t == 1:
    result = decode_part(
        q_bkxh, kv.k_bksh, kv.v_bksh, kv.mask_bts, 0, jnp.max(kv.index) + 1, dtype, scale, native
    )
  else:
    result = attend_part(q_bkxh, kv.k_bksh, kv.v_bksh, as_bxs(kv.mask_bts), dtype, scale)
  for k_gksh, v_gksh, mask_bts in zip(kv.context_k, kv.context_v, kv.context_masks):
    if t == 1:
      slots = k_gksh.shape[2]
      part = decode_part(
          q_bkxh, k_gksh, v_gksh, mask_bts, first_seen(mask_bts), slots, dtype, scale, native
      )
    else:
      part = attend_part(q_bkxh, k_gksh, v_gksh, as_bxs(mask_bts), dtype, scale)
    result = merge_parts(part, result)
  out_bkxh = result.out_bkxh / jnp.maximum(result.sum_bkx, 1e-30)[..., None]
  out_btnh = out_bkxh.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out_btnh.astype(dtype), kv
