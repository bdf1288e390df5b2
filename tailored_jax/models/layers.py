"""Model pieces every family shares: the parameter helper, initialisation on dummy tokens, the
grouped-query attention core over the KV cache and its contexts, the layer stack, and the
HF tensor-table entry.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from tailored_jax.config_lib import REMAT_POLICIES
from tailored_jax.models import cpu_attention
from tailored_jax.models.kv_cache import Context, KVCache

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True, kw_only=True)
class Execution:
  """How a model runs, whatever its architecture, declared once: every family's config
  inherits these fields, and `execution_of` reads them from a config's `model` section."""

  dtype: str = "float32"  # activation/compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # config_lib.REMAT_POLICIES
  scan_layers: bool = False  # one nn.scan over stacked layers
  cpu_attention: str = "native"  # config_lib.CPU_ATTENTION


def execution_of(model_section) -> dict:
  """The `Execution` fields of a config's `model` section, as keyword arguments."""
  return {f.name: model_section[f.name] for f in dataclasses.fields(Execution)}


def param(module: nn.Module, name: str, shape: tuple, axes: tuple, dtype, init) -> jax.Array:
  """A parameter carrying logical axis names (placed on the mesh by `sharding.py`'s rules)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def init_boxed_params(model: nn.Module, key) -> dict:
  """Parameters initialised on dummy tokens, still boxed with their logical axes."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  return model.init(key, tokens, tokens, jnp.ones((1, 8), bool))["params"]


def abstract_boxed_params(model: nn.Module) -> dict:
  """Shapes and dtypes of the parameters (nothing allocated), boxed with their logical axes."""
  return jax.eval_shape(lambda key: init_boxed_params(model, key), jax.random.PRNGKey(0))


def abstract_params(model: nn.Module) -> dict:
  """Shapes and dtypes of the parameters (nothing allocated), unboxed."""
  return nn.meta.unbox(abstract_boxed_params(model))


class HFTensor(NamedTuple):
  """One entry of a family's tensor table: where an HF tensor lives in our tree, its HF shape,
  and the two layout conversions."""

  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def tree_get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def tree_set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def attention_mask(
    valid_bs: jax.Array, index: jax.Array, num_new: int, window: int = 0
) -> jax.Array:
  """[batch, new, slots]: a new token at slot index+t sees valid slots up to and including itself
  (and, with a sliding `window`, only the last `window` slots; real tokens are contiguous)."""
  slots = valid_bs.shape[1]
  query_slot_t = index + jnp.arange(num_new)
  key_slot_s = jnp.arange(slots)[None, :]
  causal_ts = key_slot_s <= query_slot_t[:, None]
  if window:
    causal_ts &= key_slot_s > query_slot_t[:, None] - window
  return valid_bs[:, None, :] & causal_ts[None, :, :]


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


def dense(x_bi, w_i_):
  """x[..., i] @ w[i, ...] (a weight's trailing axes are the output's): every weight matmul of
  the models. On CPU it has its own gradient: XLA:CPU copies a matmul's left operand transposed
  when the contraction runs over its rows (a weight gradient's tokens), so the narrower of the
  input and the output gradient goes on the left (the weight-sized result transposed if need
  be). Autodiff's form copied [tokens, d_ff] activations transposed, fused with the SwiGLU's
  gradient: the MLP's forward and backward were 35% slower. Same values."""
  w_io = w_i_.reshape(w_i_.shape[0], -1)
  y_bo = _cpu_dense(x_bi, w_io) if jax.default_backend() == "cpu" else x_bi @ w_io
  return y_bo.reshape(x_bi.shape[:-1] + w_i_.shape[1:])


@jax.custom_vjp
def _cpu_dense(x_bi, w_io):
  return x_bi @ w_io


def _cpu_dense_fwd(x_bi, w_io):
  return x_bi @ w_io, (x_bi, w_io)


def _cpu_dense_bwd(residuals, dy_bo):
  x_bi, w_io = residuals
  rows = tuple(range(x_bi.ndim - 1))
  dx_bi = jax.lax.dot_general(dy_bo, w_io, (((dy_bo.ndim - 1,), (1,)), ((), ())))
  if w_io.shape[0] <= w_io.shape[1]:
    dw_io = jax.lax.dot_general(x_bi, dy_bo, ((rows, rows), ((), ())))
  else:
    dw_io = jax.lax.dot_general(dy_bo, x_bi, ((rows, rows), ((), ()))).T
  return dx_bi.astype(x_bi.dtype), dw_io.astype(w_io.dtype)


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


def merge_heads(x_btnh):
  """[batch, new, heads, head_dim] -> [batch, new, heads*head_dim], so the output projection is
  one plain matmul with its weight reshaped (no transposed copy of the weight per step)."""
  b, t, n, h = x_btnh.shape
  return x_btnh.reshape(b, t, n * h)


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


# Names for the 'save_attention' remat policy. The CPU flash form's inputs (in its layout) and
# its outputs, which are also its backward's residuals: kept, the forward runs once (the
# backward would otherwise re-run it for the log-sum-exp).
FLASH_INPUTS = ("flash_query", "flash_key", "flash_value")
FLASH_OUTPUTS = ("flash_output", "flash_lse")
# The fused kernel's (`jax.nn.dot_product_attention`) inputs and output: its residuals are its
# own, so it runs again in the backward pass, from the kept inputs.
FUSED_NAMES = ("query", "key", "value", "attention")


def _tag_all(arrays, names):
  return tuple(tag(x, name) for x, name in zip(arrays, names))


def _fused_inputs(q_btnh, k_btkh, v_btkh, dtype):
  """The fused kernel's query, key and value in the compute dtype, named for the remat policy."""
  return _tag_all((x.astype(dtype) for x in (q_btnh, k_btkh, v_btkh)), FUSED_NAMES)


def _named_flash_forward(*args):
  """`_flash_forward`'s outputs named as `FLASH_OUTPUTS`: the primal outputs and the backward's
  residuals are then the same kept values."""
  return _tag_all(_flash_forward(*args), FLASH_OUTPUTS)


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


def _local_rows_and_heads(rows: int, heads: int) -> tuple[int, int]:
  """Rows and heads per device under the trace's mesh (rows over data × fsdp, heads over
  tensor, as `sharding.RULES` lay activations out); the whole arrays without one."""
  mesh = jax.sharding.get_abstract_mesh()
  size = lambda name: mesh.shape.get(name, 1) if not mesh.empty else 1
  row_shards, tensor = size("data") * size("fsdp"), size("tensor")
  local_rows = rows // row_shards if rows % row_shards == 0 else rows
  return local_rows, max(heads // tensor, 1)


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
  q_bkgth, k_bkht, v_bkht = _tag_all(_flash_layout(q_btnh, k_btkh, v_btkh, dtype), FLASH_INPUTS)

  def attention(q_bkgth, k_bkht, v_bkht, valid_bt):
    return _flash_attention(q_bkgth, k_bkht, v_bkht, valid_bt, True, window, block, h**-0.5)[0]

  local_rows, local_heads = _local_rows_and_heads(b, n)
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
  q_bkgth, k_bkht, v_bkht = _tag_all(_flash_layout(q_btnh, k_btkh, v_btkh, dtype), FLASH_INPUTS)
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
  local_groups, local_heads = _local_rows_and_heads(groups, n)
  out_bkgth = _map_row_tiles(
      attention,
      row_tiles(local_groups, per_group, local_heads, t, t + s, block),
      per_group,
      (q_bkgth, k_bkht, v_bkht, valid_bt, kv.mask_bts),
      (kv.k_gksh, kv.v_gksh),
  )
  return _from_flash_layout(out_bkgth)


def fused_context_attention(
    q_btnh, k_btkh, v_btkh, valid_bt, kv: ContextKV, dtype, window: int = 0
):
  """`blockwise_context_attention` as one `jax.nn.dot_product_attention` over the context's
  keys (repeated for each row of a group) and the rows' own, under one explicit mask."""
  b, t = valid_bt.shape
  q_btnh, k_btkh, v_btkh = _fused_inputs(q_btnh, k_btkh, v_btkh, dtype)
  per_row = lambda x_gksh: jnp.swapaxes(jnp.repeat(x_gksh, b // x_gksh.shape[0], axis=0), 1, 2)
  k_bskh = jnp.concatenate([per_row(kv.k_gksh).astype(dtype), k_btkh], axis=1)
  v_bskh = jnp.concatenate([per_row(kv.v_gksh).astype(dtype), v_btkh], axis=1)
  pos = jnp.arange(t)
  seen_tt = pos[None, :] <= pos[:, None]
  if window:
    seen_tt &= pos[None, :] > pos[:, None] - window
  mask_bts = jnp.concatenate([kv.mask_bts, seen_tt[None] & valid_bt[:, None, :]], axis=2)
  return tag(
      jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None]), FUSED_NAMES[3]
  )


def native_context_attention(q_btnh, k_btkh, v_btkh, valid_bt, kv: ContextKV):
  """`blockwise_context_attention`'s values (no window) from the native CPU kernel, the context
  and the rows' own keys under one softmax; named as the blockwise form's for the remat policy."""
  q_btnh, k_btkh, v_btkh = _tag_all((q_btnh, k_btkh, v_btkh), FLASH_INPUTS)
  context = (kv.k_gksh, kv.v_gksh, kv.mask_bts[:, 0, :])  # without a window, the same per token
  return cpu_attention.flash_attention(q_btnh, k_btkh, v_btkh, valid_bt, 0, FLASH_OUTPUTS, context)[
      0
  ]


def uses_native_attention(cfg) -> bool:
  """Whether a model config's training attention runs the native CPU kernel here (rows after a
  context with a sliding window still take the XLA form)."""
  return jax.default_backend() == "cpu" and cpu_attention.chosen(cfg.cpu_attention, cfg.dtype)


def context_attention(
    q_btnh,
    k_btkh,
    v_btkh,
    valid_bt,
    kv: ContextKV,
    dtype,
    window: int = 0,
    cpu_kernel: str = "native",
):
  """Training rows after a read-only context: on CPU the native kernel (as `causal_attention`
  picks it; without a window) or two flash parts merged (`blockwise_context_attention`),
  elsewhere one fused call (`fused_context_attention`)."""
  if jax.default_backend() == "cpu":
    if not window and cpu_attention.chosen(cpu_kernel, dtype):
      return native_context_attention(q_btnh, k_btkh, v_btkh, valid_bt, kv).astype(dtype)
    return blockwise_context_attention(q_btnh, k_btkh, v_btkh, valid_bt, kv, dtype, window)
  return fused_context_attention(q_btnh, k_btkh, v_btkh, valid_bt, kv, dtype, window)


def native_causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, window: int = 0):
  """`blockwise_causal_attention`'s values from the native CPU kernel (`cpu_attention`), its
  inputs and outputs named as the blockwise form's for the 'save_attention' policy."""
  q_btnh, k_btkh, v_btkh = _tag_all((q_btnh, k_btkh, v_btkh), FLASH_INPUTS)
  return cpu_attention.flash_attention(q_btnh, k_btkh, v_btkh, valid_bt, window, FLASH_OUTPUTS)[0]


def causal_attention(
    q_btnh, k_btkh, v_btkh, valid_bt, dtype, window: int = 0, cpu_kernel: str = "native"
):
  """Self-attention over the tokens themselves, with no cache (training): causal, keys at
  padding masked, grouped-query. On CPU the native kernel (`cpu_kernel` 'native', where it
  builds and takes the dtype) or the blockwise XLA form ('xla'); elsewhere
  `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU where it applies)."""
  if jax.default_backend() == "cpu":
    if cpu_attention.chosen(cpu_kernel, dtype):
      return native_causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, window).astype(dtype)
    return blockwise_causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window)
  q_btnh, k_btkh, v_btkh = _fused_inputs(q_btnh, k_btkh, v_btkh, dtype)
  return tag(
      jax.nn.dot_product_attention(
          q_btnh,
          k_btkh,
          v_btkh,
          mask=valid_bt[:, None, None, :],
          is_causal=True,
          local_window_size=(window - 1, 0) if window else None,
      ),
      FUSED_NAMES[3],
  )


def attend(
    q_btnh,
    k_btkh,
    v_btkh,
    valid_bt,
    kv: LayerKV | KeptKV | ContextKV | None,
    dtype,
    window: int = 0,
    cpu_kernel: str = "native",
):
  """Attention for one layer: with the cache's `kv`, the new keys and values are written into it
  (`cached_attention`); without one (training), tokens attend causally to themselves (`valid_bt`
  masks padding; on CPU by `cpu_kernel`, see `causal_attention`) and nothing is stored but, with
  a `KeptKV`, its first tokens' keys and values;
  with a `ContextKV` (training) they also see its read-only context. Returns (out, kv)."""
  q_btnh = constrain(q_btnh, ("batch", "length", "heads", "head_dim"))
  k_btkh = constrain(k_btkh, ("batch", "length", "kv_heads", "head_dim"))
  v_btkh = constrain(v_btkh, ("batch", "length", "kv_heads", "head_dim"))
  if isinstance(kv, ContextKV):
    out_btnh = context_attention(q_btnh, k_btkh, v_btkh, valid_bt, kv, dtype, window, cpu_kernel)
  elif kv is None or isinstance(kv, KeptKV):
    out_btnh = causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window, cpu_kernel)
    if kv is not None:
      first = lambda x_btkh: jnp.swapaxes(x_btkh[:, : kv.length], 1, 2).astype(dtype)
      kv = kv.replace(k_bksh=first(k_btkh), v_bksh=first(v_btkh))
  else:
    out_btnh, kv = cached_attention(q_btnh, k_btkh, v_btkh, kv, dtype)
  out_btnh = constrain(out_btnh, ("batch", "length", "heads", "head_dim"))
  return out_btnh, kv


LAYERS = "layers"  # the stacked layers' key in a scanned model's parameters

# What a block keeps for the backward pass (model.remat): 'none' everything; 'full' only its
# input (the block is recomputed); 'minimal' the weight matmuls' outputs (norms, rotary,
# attention and activations recomputed); 'save_attention' what the attention's backward reads,
# tagged with `checkpoint_name`: the CPU flash form's inputs and outputs (`FLASH_INPUTS`,
# `FLASH_OUTPUTS`: it runs once), the fused kernel's inputs and output (`FUSED_NAMES`).


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"config field model.remat: {name!r} is not one of {list(REMAT_POLICIES)}")
  policies = jax.checkpoint_policies
  return {
      "full": policies.nothing_saveable,
      "minimal": policies.dots_with_no_batch_dims_saveable,
      "save_attention": policies.save_only_these_names(*FLASH_INPUTS, *FLASH_OUTPUTS, *FUSED_NAMES),
  }.get(name)


# Logical axes of activations: rows over the batch mesh axes, heads/MLP/vocabulary over tensor,
# the residual stream whole on each device ('act_embed': never the weights' fsdp split).
RESIDUAL = ("batch", "length", "act_embed")
MLP_HIDDEN = ("batch", "length", "mlp")
LOGITS = ("batch", "length", "vocab")


def constrain(x, axes: tuple):
  """Pins an activation's layout by logical axis names when the trainer traces under
  `sharding.activation_layout` (a no-op elsewhere: decoding, tests without a mesh)."""
  return nn.with_logical_constraint(x, axes)


def tag(x, name: str):
  """Names an activation for the 'save_attention' remat policy."""
  return checkpoint_name(x, name)


@flax.struct.dataclass
class _LayerContext:
  """A scanned layer's slice of a read-only training context (its mask is shared)."""

  k_gksh: jax.Array
  v_gksh: jax.Array


@flax.struct.dataclass
class _LayerCache:
  """A scanned layer's slice of the cache: its own buffers and its contexts' keys/values."""

  k_bksh: jax.Array
  v_bksh: jax.Array
  context_k: tuple
  context_v: tuple


class _ScannedLayer(nn.Module):
  """One block as a scan body: the block shares this module's scope, so a scanned model's
  parameters are `layers/<block's own names>` with a leading layer axis."""

  block_cls: type
  cfg: object
  keep_kv: int = 0  # training: keep the first tokens' keys and values (KeptKV)

  def setup(self):
    self.block = self.block_cls(self.cfg)
    nn.share_scope(self, self.block)

  def __call__(
      self, x_btd, positions_bt, valid_bt, shared, layer: _LayerCache | _LayerContext | None
  ):
    kv = KeptKV(self.keep_kv) if self.keep_kv else None
    if isinstance(layer, _LayerContext):
      kv = ContextKV(layer.k_gksh, layer.v_gksh, shared)
    elif layer is not None:
      index, mask_bts, context_masks = shared
      kv = LayerKV(
          layer.k_bksh,
          layer.v_bksh,
          index,
          mask_bts,
          layer.context_k,
          layer.context_v,
          context_masks,
      )
    x_btd, kv = self.block(x_btd, positions_bt, valid_bt, kv)
    stored = (kv.k_bksh, kv.v_bksh) if isinstance(kv, (LayerKV, KeptKV)) else None
    return constrain(x_btd, RESIDUAL), stored


def _scan_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, shared, layer, keep_kv=0):
  body = _ScannedLayer
  if cfg.remat != "none":
    body = nn.remat(body, policy=remat_policy(cfg.remat), prevent_cse=False)
  scanned = nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
      length=cfg.n_layers,
      metadata_params={nn.PARTITION_NAME: LAYERS},
  )
  return scanned(block_cls, cfg, keep_kv, name=LAYERS)(x_btd, positions_bt, valid_bt, shared, layer)


def _per_layer_training(block_cls, cfg, x_btd, positions_bt, valid_bt, layer_kv) -> tuple:
  """The unscanned training stack: blocks layer_i, rematerialised by `cfg.remat`, each called
  with `layer_kv(i)`; returns the output and each block's returned kv."""
  block = block_cls
  if cfg.remat != "none":
    block = nn.remat(block_cls, policy=remat_policy(cfg.remat))
  kvs = []
  for layer in range(cfg.n_layers):
    x_btd, kv = block(cfg, name=f"layer_{layer}")(x_btd, positions_bt, valid_bt, layer_kv(layer))
    x_btd = constrain(x_btd, RESIDUAL)
    kvs.append(kv)
  return x_btd, kvs


def _run_after_context(
    block_cls, cfg, x_btd, positions_bt, valid_bt, context: Context, window: int
):
  """Training rows after a read-only context (`ContextKV`): the layer stack, rematerialised."""
  mask_bts = context_mask(context.positions_gs, positions_bt, window)
  if cfg.scan_layers:
    layer = _LayerContext(context.keys, context.values)
    x_btd, _ = _scan_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, mask_bts, layer)
    return x_btd
  layer_kv = lambda i: ContextKV(context.keys[i], context.values[i], mask_bts)
  return _per_layer_training(block_cls, cfg, x_btd, positions_bt, valid_bt, layer_kv)[0]


def run_blocks(
    block_cls,
    cfg,
    x_btd,
    positions_bt,
    valid_bt,
    cache: KVCache | Context | None,
    window: int = 0,
    keep_kv: int = 0,
):
  """The layer stack shared by every family: `cfg.n_layers` blocks, each called as
  `block(x, positions, valid, kv)` and rematerialised by `cfg.remat`'s policy; with
  `cfg.scan_layers` one block body under `nn.scan` over stacked parameters (`layers/...`: one
  compile of one layer, whatever the depth), else blocks named layer_i. With a cache (stacked
  per layer when scanned), masks come from its slots and its contexts, and the updated cache is
  returned; without one (training), tokens attend causally to themselves, no keys or values
  are kept and the returned cache is None, or with `keep_kv` > 0 it holds the first `keep_kv`
  tokens' keys and values (a filled cache of that many slots). With a `Context` (training rows
  continuing after it), they also attend to its keys and values, and nothing is returned for
  it. Call it from inside a compact method."""
  if isinstance(cache, Context):
    return _run_after_context(block_cls, cfg, x_btd, positions_bt, valid_bt, cache, window), None
  scan = cfg.scan_layers
  if cache is None:
    if scan:
      x_btd, kept = _scan_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, None, None, keep_kv)
    else:
      x_btd, kvs = _per_layer_training(
          block_cls,
          cfg,
          x_btd,
          positions_bt,
          valid_bt,
          lambda _: KeptKV(keep_kv) if keep_kv else None,
      )
      kept = (tuple(kv.k_bksh for kv in kvs), tuple(kv.v_bksh for kv in kvs)) if keep_kv else None
    if not keep_kv:
      return x_btd, None
    return x_btd, KVCache(kept[0], kept[1], valid_bt[:, :keep_kv], jnp.asarray(keep_kv, jnp.int32))
  t = x_btd.shape[1]
  valid_bs = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, valid_bt, cache.index, axis=1)
  mask_bts = attention_mask(valid_bs, cache.index, t, window)
  context_masks = tuple(context_mask(c.positions_gs, positions_bt, window) for c in cache.context)
  if scan:
    layer = _LayerCache(
        cache.keys,
        cache.values,
        tuple(c.keys for c in cache.context),
        tuple(c.values for c in cache.context),
    )
    x_btd, (keys, values) = _scan_blocks(
        block_cls, cfg, x_btd, positions_bt, valid_bt, (cache.index, mask_bts, context_masks), layer
    )
  else:
    keys, values = [], []
    for layer in range(cfg.n_layers):
      kv = LayerKV(
          cache.keys[layer],
          cache.values[layer],
          cache.index,
          mask_bts,
          tuple(c.keys[layer] for c in cache.context),
          tuple(c.values[layer] for c in cache.context),
          context_masks,
      )
      x_btd, kv = block_cls(cfg, name=f"layer_{layer}")(x_btd, positions_bt, valid_bt, kv)
      keys.append(kv.k_bksh)
      values.append(kv.v_bksh)
    keys, values = tuple(keys), tuple(values)
  return x_btd, cache.replace(keys=keys, values=values, valid_bs=valid_bs, index=cache.index + t)


def is_stacked(params) -> bool:
  return LAYERS in params


def stack_layers(params: dict, n_layers: int, stack=None) -> dict:
  """A per-layer tree (`layer_i/...`) as a scanned model's (`layers/...`, leading layer axis),
  one parameter at a time: `stack(path, parts)` builds each stacked array (e.g. onto its
  devices), after which that parameter's per-layer arrays are dropped, so the peak is the model
  plus one stacked parameter. Consumes `params`' per-layer subtrees."""
  stack = stack or (
      lambda _, parts: np.stack(parts) if isinstance(parts[0], np.ndarray) else jnp.stack(parts)
  )
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  layers = [params[f"layer_{i}"] for i in range(n_layers)]
  stacked: dict = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(layers[0])[0]:
    keys = tuple(k.key for k in path)
    tree_set(stacked, keys, stack(keys, [tree_get(layer, keys) for layer in layers]))
    for layer in layers:
      tree_set(layer, keys, None)
  out[LAYERS] = stacked
  return out


def unstack_layers(params: dict) -> dict:
  """A scanned model's tree as the per-layer one (`layer_i/...`); other trees unchanged."""
  if not is_stacked(params):
    return params
  out = {k: v for k, v in params.items() if k != LAYERS}
  n_layers = jax.tree.leaves(params[LAYERS])[0].shape[0]
  for i in range(n_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params[LAYERS])
  return out
