"""The training attention as blockwise XLA: a block of queries at a time over the keys it can see,
with a flash-style gradient (only the output and each query's log-sum-exp kept). Any platform
runs it; on CPU it is the form where the native kernel cannot run (`cpu_blockwise`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tailored_jax.models.annotations import tag_all
from tailored_jax.models.attention.contexts import ContextKV
from tailored_jax.models.attention.masks import NEG_INF
from tailored_jax.models.attention.names import FLASH_INPUTS, FLASH_OUTPUTS
from tailored_jax.models.attention.shard import local_rows_and_heads

ATTENTION_BLOCK = 128  # query rows per block of the CPU training attention


def query_blocks(t: int, block: int, window: int):
  """(first query, end, first key) of each block of queries: a block sees keys up to its end."""
  for start in range(0, t, block):
    yield start, min(start + block, t), max(0, start - window + 1) if window else 0


def _part_blocks(t: int, s: int, causal: bool, window: int, block: int):
  """(first query, end, first key, end key) of each block of queries: causally a block sees the
  keys up to its last query; over a context it sees all `s`."""
  for start, end, k_start in query_blocks(t, block, window if causal else 0):
    yield (start, end, k_start, end) if causal else (start, end, 0, s)


def _block_mask(
    mask, causal: bool, start: int, end: int, k_start: int, k_end: int, window: int
) -> jax.Array:
  """[rows, queries, keys] seen by a block: causally from the positions and `mask` = the keys'
  validity [rows, tokens]; over a context `mask` is [rows, queries, keys] itself."""
  if not causal:
    return mask[:, start:end, k_start:k_end]
  q_pos = start + jnp.arange(end - start)
  k_pos = k_start + jnp.arange(k_end - k_start)
  seen_qs = k_pos[None, :] <= q_pos[:, None]
  if window:
    seen_qs &= k_pos[None, :] > q_pos[:, None] - window
  return seen_qs[None] & mask[:, None, k_start:k_end]


def _grouped_einsum(spec: str, *operands, groups: int = 0):
  """`jnp.einsum` where an operand or output led by 'c' is per group of consecutive rows (a
  context's keys and values, read by each of its rows) and one led by 'b' is per row; `groups`
  is needed when no operand is per group."""
  inputs, output = spec.split("->")
  inputs = inputs.split(",")
  rows = next(x.shape[0] for x, s in zip(operands, inputs) if s[0] == "b")
  groups = groups or next(x.shape[0] for x, s in zip(operands, inputs) if s[0] == "c")
  if groups == rows:
    return jnp.einsum(spec.replace("c", "b"), *operands)
  per_group = rows // groups
  operands = [
      x.reshape(groups, per_group, *x.shape[1:]) if s[0] == "b" else x
      for x, s in zip(operands, inputs)
  ]
  grouped = lambda s: "cr" + s[1:] if s[0] == "b" else s
  out = jnp.einsum(",".join(map(grouped, inputs)) + "->" + grouped(output), *operands)
  return out.reshape(rows, *out.shape[2:]) if output[0] == "b" else out


def _block_scores(q_bkgqh, k_ckhs, seen_bqs, scale: float):
  """Float32 scores of a block of queries over keys; NEG_INF where not seen."""
  scores_bkgqs = _grouped_einsum("bkgqh,ckhs->bkgqs", q_bkgqh, k_ckhs).astype(jnp.float32) * scale
  return jnp.where(seen_bqs[:, None, None], scores_bkgqs, NEG_INF)


def _flash_forward(q_bkgth, k_ckhs, v_ckhs, mask, causal, window, block, scale):
  """Output and per-query log-sum-exp of the scores, a block of queries at a time."""
  outs, lses = [], []
  for start, end, k_start, k_end in _part_blocks(
      q_bkgth.shape[3], k_ckhs.shape[3], causal, window, block
  ):
    scores_bkgqs = _block_scores(
        q_bkgth[:, :, :, start:end],
        k_ckhs[..., k_start:k_end],
        _block_mask(mask, causal, start, end, k_start, k_end, window),
        scale,
    )
    max_bkgq = jnp.max(scores_bkgqs, axis=-1)
    weights_bkgqs = jnp.exp(scores_bkgqs - max_bkgq[..., None])
    sum_bkgq = jnp.sum(weights_bkgqs, axis=-1)
    out_bkgqh = _grouped_einsum(
        "bkgqs,ckhs->bkgqh", weights_bkgqs.astype(v_ckhs.dtype), v_ckhs[..., k_start:k_end]
    ).astype(jnp.float32)
    outs.append((out_bkgqh / sum_bkgq[..., None]).astype(q_bkgth.dtype))
    lses.append(max_bkgq + jnp.log(sum_bkgq))
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


def _named_flash_forward(*args):
  """`_flash_forward`'s outputs named as `FLASH_OUTPUTS`: the primal outputs and the backward's
  residuals are then the same kept values."""
  return tag_all(_flash_forward(*args), FLASH_OUTPUTS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash_attention(
    q_bkgth, k_ckhs, v_ckhs, mask, causal: bool, window: int, block: int, scale: float
):
  """(output, log-sum-exp) of one part of the keys; `mask` as `_block_mask` reads it."""
  return _named_flash_forward(q_bkgth, k_ckhs, v_ckhs, mask, causal, window, block, scale)


def _flash_attention_fwd(q_bkgth, k_ckhs, v_ckhs, mask, causal, window, block, scale):
  outputs = _named_flash_forward(q_bkgth, k_ckhs, v_ckhs, mask, causal, window, block, scale)
  return outputs, (q_bkgth, k_ckhs, v_ckhs, mask, *outputs)


def _flash_attention_bwd(causal, window, block, scale, residuals, cotangents):
  """Each block's probabilities recomputed from its scores and the saved log-sum-exp."""
  q_bkgth, k_ckhs, v_ckhs, mask, out_bkgth, lse_bkgt = residuals
  dout_bkgth, dlse_bkgt = cotangents
  # d(softmax) needs each query's sum over keys of p * dp, which is dout . out; the
  # log-sum-exp's own gradient reaches each score as dlse * p
  delta_bkgt = (
      jnp.sum(dout_bkgth.astype(jnp.float32) * out_bkgth.astype(jnp.float32), axis=-1) - dlse_bkgt
  )
  dq_blocks = []
  dk_ckhs = jnp.zeros(k_ckhs.shape, jnp.float32)
  dv_ckhs = jnp.zeros(v_ckhs.shape, jnp.float32)
  for start, end, k_start, k_end in _part_blocks(
      q_bkgth.shape[3], k_ckhs.shape[3], causal, window, block
  ):
    q_bkgqh, dout_bkgqh = q_bkgth[:, :, :, start:end], dout_bkgth[:, :, :, start:end]
    k_ckhs_, v_ckhs_ = k_ckhs[..., k_start:k_end], v_ckhs[..., k_start:k_end]
    scores_bkgqs = _block_scores(
        q_bkgqh, k_ckhs_, _block_mask(mask, causal, start, end, k_start, k_end, window), scale
    )
    probs_bkgqs = jnp.exp(scores_bkgqs - lse_bkgt[:, :, :, start:end, None])
    dv_ckhs = dv_ckhs.at[..., k_start:k_end].add(
        _grouped_einsum(
            "bkgqh,bkgqs->ckhs",
            dout_bkgqh,
            probs_bkgqs.astype(dout_bkgqh.dtype),
            groups=k_ckhs.shape[0],
        )
    )
    dprobs_bkgqs = _grouped_einsum("bkgqh,ckhs->bkgqs", dout_bkgqh, v_ckhs_).astype(jnp.float32)
    dscores_bkgqs = (
        probs_bkgqs * (dprobs_bkgqs - delta_bkgt[:, :, :, start:end, None]) * scale
    ).astype(q_bkgqh.dtype)
    dq_blocks.append(_grouped_einsum("bkgqs,ckhs->bkgqh", dscores_bkgqs, k_ckhs_))
    dk_ckhs = dk_ckhs.at[..., k_start:k_end].add(
        _grouped_einsum("bkgqh,bkgqs->ckhs", q_bkgqh, dscores_bkgqs, groups=k_ckhs.shape[0])
    )
  dq_bkgth = jnp.concatenate(dq_blocks, axis=3)
  return dq_bkgth, dk_ckhs.astype(k_ckhs.dtype), dv_ckhs.astype(v_ckhs.dtype), None


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def _flash_layout(q_btnh, k_btkh, v_btkh, dtype):
  """Queries as [batch, kv_heads, group, tokens, head_dim]; keys and values as [batch,
  kv_heads, head_dim, tokens]: every matmul of the pass, forward and backward, then reads its
  operands in the order XLA:CPU's matmul takes without a copy."""
  b, t, n, h = q_btnh.shape
  kv_heads = k_btkh.shape[2]
  q_bkgth = q_btnh.astype(dtype).reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  k_bkht, v_bkht = (x.astype(dtype).transpose(0, 2, 3, 1) for x in (k_btkh, v_btkh))
  return q_bkgth, k_bkht, v_bkht


def _from_flash_layout(out_bkgth):
  b, k, g, t, h = out_bkgth.shape
  return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


# Rows of the CPU training attention per map step: at most this many bytes of one query block's
# float32 scores, so that each step's score passes stay in cache (with every row's blocks at
# once, each pass streamed them through memory). Measured on a 2-core EPYC (1 MiB L2 per core,
# 8 heads of 64): forward + backward at 8 x 512 tokens 108 -> 76 ms with one row per step, at
# 8 x 256 37 -> 26 ms with two; at 8 x 128 (4 MiB in all) mapping cost more than it saved, so
# rows whose blocks come to at most twice this run at once.
ATTENTION_TILE_BYTES = 2 << 20


def row_tiles(
    local_groups: int,
    rows_per_group: int,
    local_heads: int,
    queries: int,
    keys: int,
    block: int = ATTENTION_BLOCK,
    tile_bytes: int = 0,
) -> int:
  """How many map steps the attention takes over one device's rows: the fewest that divide its
  groups of rows (a context's groups, or single rows) and bring a step's largest score block
  under `tile_bytes` (0: `ATTENTION_TILE_BYTES`; 1 step: all rows at once, also whenever they
  come to at most twice it)."""
  tile_bytes = tile_bytes or ATTENTION_TILE_BYTES
  per_group = rows_per_group * local_heads * min(block, queries) * keys * 4
  if local_groups * per_group <= 2 * tile_bytes:
    return 1
  for steps in range(1, local_groups + 1):
    if local_groups % steps == 0 and local_groups // steps * per_group <= tile_bytes:
      return steps
  return local_groups


def _map_row_tiles(fn, steps: int, rows_per_group: int, row_args: tuple, group_args: tuple = ()):
  """`fn(*row_args, *group_args)` a tile of rows at a time (`jax.lax.map`, sequential), where
  tile j holds groups i·steps + j (so on a row-sharded mesh every device holds its share of
  every tile) with their `rows_per_group` consecutive rows; `fn`'s outputs are per row."""
  if steps == 1:
    return fn(*row_args, *group_args)

  def split(x, per):  # [groups·per, ...] -> [steps, groups/steps·per, ...]
    n = x.shape[0] // per
    return (
        x.reshape(n // steps, steps, per, *x.shape[1:])
        .swapaxes(0, 1)
        .reshape(steps, n // steps * per, *x.shape[1:])
    )

  def join(y):
    n = y.shape[1] // rows_per_group
    return (
        y.reshape(steps, n, rows_per_group, *y.shape[2:])
        .swapaxes(0, 1)
        .reshape(steps * y.shape[1], *y.shape[2:])
    )

  tiles = (
      tuple(split(x, rows_per_group) for x in row_args),
      tuple(split(x, 1) for x in group_args),
  )
  out = jax.lax.map(lambda tile: fn(*tile[0], *tile[1]), tiles)
  return jax.tree.map(join, out)


def blockwise_causal_attention(
    q_btnh, k_btkh, v_btkh, valid_bt, dtype, window: int = 0, block: int = ATTENTION_BLOCK
):
  """Causal grouped-query self-attention a block of queries at a time, each block reading only
  the keys at or before its last query (the masked upper triangle is never computed), with a
  flash-attention-style gradient: only the output and each query's log-sum-exp are kept, each
  block's probabilities recomputed from its scores. Scores in float32, [batch, heads, block,
  keys] per block rather than [batch, heads, tokens, tokens], and a tile of rows at a time
  (`row_tiles`; within a tile XLA keeps the unrolled blocks' buffers live together)."""
  b, t, n, h = q_btnh.shape
  q_bkgth, k_bkht, v_bkht = tag_all(_flash_layout(q_btnh, k_btkh, v_btkh, dtype), FLASH_INPUTS)

  def attention(q_bkgth, k_bkht, v_bkht, valid_bt):
    return _flash_attention(q_bkgth, k_bkht, v_bkht, valid_bt, True, window, block, h**-0.5)[0]

  local_rows, local_heads = local_rows_and_heads(b, n)
  out_bkgth = _map_row_tiles(
      attention,
      row_tiles(local_rows, 1, local_heads, t, t, block),
      1,
      (q_bkgth, k_bkht, v_bkht, valid_bt),
  )
  return _from_flash_layout(out_bkgth)


def blockwise_context_attention(
    q_btnh,
    k_btkh,
    v_btkh,
    valid_bt,
    kv: ContextKV,
    dtype,
    window: int = 0,
    block: int = ATTENTION_BLOCK,
):
  """Rows continuing after a read-only context: one softmax over the context's keys and their
  own (causal), computed as two flash parts (`_flash_attention`) merged by their log-sum-exps;
  the merge is differentiated as written, so each part's gradient gets its share."""
  b, t, n, h = q_btnh.shape
  groups, s = kv.k_gksh.shape[0], kv.k_gksh.shape[2]
  q_bkgth, k_bkht, v_bkht = tag_all(_flash_layout(q_btnh, k_btkh, v_btkh, dtype), FLASH_INPUTS)
  scale = h**-0.5

  def attention(
      q_bkgth, k_bkht, v_bkht, valid_bt, context_mask_bts, context_k_gksh, context_v_gksh
  ):
    own_bkgth, own_lse_bkgt = _flash_attention(
        q_bkgth, k_bkht, v_bkht, valid_bt, True, window, block, scale
    )
    context_k_gkhs, context_v_gkhs = (
        jnp.swapaxes(x, 2, 3).astype(dtype) for x in (context_k_gksh, context_v_gksh)
    )
    context_bkgth, context_lse_bkgt = _flash_attention(
        q_bkgth, context_k_gkhs, context_v_gkhs, context_mask_bts, False, 0, block, scale
    )
    lse_bkgt = jnp.logaddexp(own_lse_bkgt, context_lse_bkgt)
    share = lambda part_lse_bkgt: jnp.exp(part_lse_bkgt - lse_bkgt)[..., None]
    return (
        own_bkgth.astype(jnp.float32) * share(own_lse_bkgt)
        + context_bkgth.astype(jnp.float32) * share(context_lse_bkgt)
    ).astype(dtype)

  per_group = b // groups
  local_groups, local_heads = local_rows_and_heads(groups, n)
  out_bkgth = _map_row_tiles(
      attention,
      row_tiles(local_groups, per_group, local_heads, t, t + s, block),
      per_group,
      (q_bkgth, k_bkht, v_bkht, valid_bt, kv.mask_bts),
      (kv.k_gksh, kv.v_gksh),
  )
  return _from_flash_layout(out_bkgth)
