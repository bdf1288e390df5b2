"""The training attention on TPU: JAX's Pallas splash attention (Mosaic TPU kernels, forward and
backward), per device under the trace's mesh.

Padding is expressed as segment ids (a real token 1, padding 0: a real query sees real keys
only; a padding query sees padding, itself at least, so no softmax row is empty); lengths are
padded up to the kernel's 128-token lanes with padding tokens, and head sizes up to 128 with
zero columns (the scores do not change; the extra output columns are dropped). Rows after a
read-only context (self-reflection's continuations) run one kernel over the context's slots
then their own tokens: a causal mask shifted by the context's length sees every context slot,
and segment ids keep the slots the row does not see out. JAX's kernel rather than tokamax's:
it ships with the pinned jax (no second version to keep in step), takes grouped-query heads,
segment ids and local masks, and runs in Pallas interpret mode on CPU, where its values and
gradients are tested against the XLA form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from tailored_jax.models.annotations import tag
from tailored_jax.models.attention import shard
from tailored_jax.models.attention.contexts import ContextKV
from tailored_jax.models.attention.names import FUSED_NAMES
from tailored_jax.models.attention.fused import fused_inputs

LANES = 128  # the kernel's tiles: lengths and head sizes are padded to a multiple of this
BLOCKS = (512, 256, 128)  # query/key block sizes tried, largest first


def _round_up(n: int, to: int) -> int:
  return -(-n // to) * to


def _block(length: int) -> int:
  return next(b for b in BLOCKS if length % b == 0)


def _kernel(heads: int, queries: int, keys: int, offset: int, window: int, interpret: bool):
  """The splash kernel for one device's heads: queries [heads, queries, head_dim] over keys
  [kv_heads, keys, head_dim], key j seen by query i when j <= i + offset (and, with a sliding
  window, j > i + offset - window)."""
  shape = (queries, keys)
  if window:
    mask = mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=offset)
  else:
    mask = mask_lib.CausalMask(shape, offset=offset)
  bq, bkv = _block(queries), _block(keys)
  sizes = kernel_lib.BlockSizes(
      block_q=bq,
      block_kv=bkv,
      block_kv_compute=bkv,
      block_q_dkv=bq,
      block_kv_dkv=bkv,
      block_kv_dkv_compute=bkv,
      block_q_dq=bq,
      block_kv_dq=bkv,
  )
  # built in the trace that calls it (its mask tables are that trace's constants; a kernel
  # kept across traces would carry one trace's values into another)
  return kernel_lib.make_splash_mha(
      mask_lib.MultiHeadMask([mask] * heads),
      block_sizes=sizes,
      head_shards=1,
      q_seq_shards=1,
      interpret=interpret,
  )


def _pad(x, axis: int, to: int):
  width = [(0, 0)] * x.ndim
  width[axis] = (0, to - x.shape[axis])
  return jnp.pad(x, width)


def _run(q_bnth, k_bksh, v_bksh, q_segments_bt, kv_segments_bs, offset, window, interpret):
  """The kernel over each row (`vmap`), lengths and head size padded; [b, n, t, h] out."""
  b, n, t, h = q_bnth.shape
  s = k_bksh.shape[2]
  tp, sp, hp = _round_up(t, LANES), _round_up(s, LANES), _round_up(h, LANES)
  q = _pad(_pad(q_bnth * jnp.asarray(h**-0.5, q_bnth.dtype), 2, tp), 3, hp)
  k, v = (_pad(_pad(x, 2, sp), 3, hp) for x in (k_bksh, v_bksh))
  q_seg, kv_seg = _pad(q_segments_bt, 1, tp), _pad(kv_segments_bs, 1, sp)
  kernel = _kernel(n, tp, sp, offset, window, interpret)
  run_row = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(qs, ks))
  return jax.vmap(run_row)(q, k, v, q_seg, kv_seg)[:, :, :t, :h]


def causal_attention(
    q_btnh, k_btkh, v_btkh, valid_bt, dtype, window: int = 0, interpret: bool = False
):
  """Causal grouped-query self-attention with padding keys masked (and, with a `window`, keys
  that far back): `fused.fused_causal_attention`'s values; [b, t, n, h] out."""
  q_btnh, k_btkh, v_btkh = fused_inputs(q_btnh, k_btkh, v_btkh, dtype)
  b, _, n, _ = q_btnh.shape
  kv_heads = k_btkh.shape[2]

  def kernel(q_btnh, k_btkh, v_btkh, valid_bt):
    segments_bt = valid_bt.astype(jnp.int32)
    q_bnth, k_bkth, v_bkth = (jnp.swapaxes(x, 1, 2) for x in (q_btnh, k_btkh, v_btkh))
    out_bnth = _run(q_bnth, k_bkth, v_bkth, segments_bt, segments_bt, 0, window, interpret)
    return jnp.swapaxes(out_bnth, 1, 2)

  mesh = shard.trace_mesh()
  if mesh is None:
    out_btnh = kernel(q_btnh, k_btkh, v_btkh, valid_bt)
  else:
    rows, heads = shard.split_axes(mesh, b, b, n, kv_heads)
    per_token, per_row = PartitionSpec(rows, None, heads, None), PartitionSpec(rows, None)
    out_btnh = shard.per_device(
        kernel, mesh, (per_token, per_token, per_token, per_row), per_token
    )(q_btnh, k_btkh, v_btkh, valid_bt)
  return tag(out_btnh, FUSED_NAMES[3])


def context_attention(
    q_btnh, k_btkh, v_btkh, valid_bt, kv: ContextKV, dtype, interpret: bool = False
):
  """Rows after a read-only context (no sliding window): one softmax over the slots of their
  group's context that they see and their own tokens, causally; `fused_context_attention`'s
  values."""
  q_btnh, k_btkh, v_btkh = fused_inputs(q_btnh, k_btkh, v_btkh, dtype)
  b, t, n, _ = q_btnh.shape
  kv_heads = k_btkh.shape[2]
  groups, s = kv.k_gksh.shape[0], kv.k_gksh.shape[2]
  seen_bs = kv.mask_bts[:, 0, :]  # without a window, the same for every token of a row

  def kernel(q_btnh, k_btkh, v_btkh, valid_bt, seen_bs, context_k_gksh, context_v_gksh):
    rows = valid_bt.shape[0]
    per_row = lambda x_gksh: jnp.repeat(x_gksh, rows // x_gksh.shape[0], axis=0).astype(dtype)
    sp = _round_up(s, LANES)
    k_bksh = jnp.concatenate(
        [_pad(per_row(context_k_gksh), 2, sp), jnp.swapaxes(k_btkh, 1, 2)], axis=2
    )
    v_bksh = jnp.concatenate(
        [_pad(per_row(context_v_gksh), 2, sp), jnp.swapaxes(v_btkh, 1, 2)], axis=2
    )
    segments_bt = valid_bt.astype(jnp.int32)
    kv_segments_bs = jnp.concatenate([_pad(seen_bs.astype(jnp.int32), 1, sp), segments_bt], axis=1)
    out_bnth = _run(
        jnp.swapaxes(q_btnh, 1, 2), k_bksh, v_bksh, segments_bt, kv_segments_bs, sp, 0, interpret
    )
    return jnp.swapaxes(out_bnth, 1, 2)

  args = (q_btnh, k_btkh, v_btkh, valid_bt, seen_bs, kv.k_gksh, kv.v_gksh)
  mesh = shard.trace_mesh()
  if mesh is None:
    return tag(kernel(*args), FUSED_NAMES[3])
  rows, heads = shard.split_axes(mesh, b, groups, n, kv_heads)
  per_token, per_row = PartitionSpec(rows, None, heads, None), PartitionSpec(rows, None)
  per_slot = PartitionSpec(rows, heads, None, None)
  out_btnh = shard.per_device(
      kernel,
      mesh,
      (per_token, per_token, per_token, per_row, per_row, per_slot, per_slot),
      per_token,
  )(*args)
  return tag(out_btnh, FUSED_NAMES[3])
