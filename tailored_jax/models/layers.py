"""Model pieces every family shares: the parameter helper, initialisation on dummy tokens, the
grouped-query attention core over the KV cache and its contexts, the layer stack, and the
HF tensor-table entry.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from tailored_jax.config_lib import REMAT_POLICIES
from tailored_jax.models.kv_cache import KVCache

NEG_INF = -1e30


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


def attention_mask(valid_bs: jax.Array, index: jax.Array, num_new: int,
                   window: int = 0) -> jax.Array:
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
  seen_bts = jnp.broadcast_to((positions_bs >= 0)[:, None, :],
                              (b, positions_bt.shape[1], positions_bs.shape[1]))
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
  logits_bkxs = jnp.einsum("grkxh,gksh->grkxs", q_grkxh, k_gksh.astype(dtype)).reshape(
      b, kv_heads, x, s).astype(jnp.float32) * scale
  mask_b1xs = mask_bxs[:, None]
  logits_bkxs = jnp.where(mask_b1xs, logits_bkxs, NEG_INF)
  max_bkx = jnp.max(logits_bkxs, axis=-1)
  weights_bkxs = jnp.where(mask_b1xs, jnp.exp(logits_bkxs - max_bkx[..., None]), 0.0)
  out_grkxh = jnp.einsum("grkxs,gksh->grkxh",
                         weights_bkxs.reshape(g, b // g, kv_heads, x, s).astype(dtype),
                         v_gksh.astype(dtype))
  return Partial(max_bkx, jnp.sum(weights_bkxs, axis=-1),
                 out_grkxh.reshape(b, kv_heads, x, h).astype(jnp.float32))


def merge_parts(a: Partial, b: Partial) -> Partial:
  """The softmax over the union of two parts' keys (online-softmax rescaling)."""
  top_bkx = jnp.maximum(a.max_bkx, b.max_bkx)
  scale_a, scale_b = jnp.exp(a.max_bkx - top_bkx), jnp.exp(b.max_bkx - top_bkx)
  return Partial(top_bkx, a.sum_bkx * scale_a + b.sum_bkx * scale_b,
                 a.out_bkxh * scale_a[..., None] + b.out_bkxh * scale_b[..., None])


def cached_attention(q_btnh, k_btkh, v_btkh, kv: LayerKV, dtype, scale: float | None = None):
  """Writes the new keys/values into the layer's own buffer at `index`, then attends over the
  contexts and the own buffer under one softmax (merged parts; grouped-query: each of the k
  kv-heads serves n/k query heads). Scores in float32. Returns (out_btnh, kv updated)."""
  start = (0, 0, kv.index, 0)
  new_k_bkth = jnp.swapaxes(k_btkh, 1, 2).astype(kv.k_bksh.dtype)
  new_v_bkth = jnp.swapaxes(v_btkh, 1, 2).astype(kv.v_bksh.dtype)
  kv = kv.replace(k_bksh=jax.lax.dynamic_update_slice(kv.k_bksh, new_k_bkth, start),
                  v_bksh=jax.lax.dynamic_update_slice(kv.v_bksh, new_v_bkth, start))
  b, t, n, h = q_btnh.shape
  kv_heads = kv.k_bksh.shape[1]
  g = n // kv_heads
  scale = h**-0.5 if scale is None else scale
  # queries as [batch, kv_head, group*new, head_dim]: one matmul per (row, kv head)
  q_bkxh = q_btnh.reshape(b, t, kv_heads, g,
                          h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h).astype(dtype)
  as_bxs = lambda mask_bts: jnp.tile(mask_bts, (1, g, 1))
  result = attend_part(q_bkxh, kv.k_bksh, kv.v_bksh, as_bxs(kv.mask_bts), dtype, scale)
  for k_gksh, v_gksh, mask_bts in zip(kv.context_k, kv.context_v, kv.context_masks):
    result = merge_parts(attend_part(q_bkxh, k_gksh, v_gksh, as_bxs(mask_bts), dtype, scale),
                         result)
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


def _block_scores(q_bkgqh, k_bkhs, valid_bs, q_start: int, k_start: int, window: int, scale: float):
  """Float32 scores of a block of queries over the keys it can see; NEG_INF where masked."""
  scores_bkgqs = jnp.einsum("bkgqh,bkhs->bkgqs", q_bkgqh, k_bkhs).astype(jnp.float32) * scale
  q_pos = q_start + jnp.arange(q_bkgqh.shape[3])
  k_pos = k_start + jnp.arange(k_bkhs.shape[3])
  seen_qs = k_pos[None, :] <= q_pos[:, None]
  if window:
    seen_qs &= k_pos[None, :] > q_pos[:, None] - window
  seen_bqs = seen_qs[None] & valid_bs[:, None, :]
  return jnp.where(seen_bqs[:, None, None], scores_bkgqs, NEG_INF)


def _blockwise_forward(q_bkgth, k_bkht, v_bkht, valid_bt, window, block, scale):
  """Output and per-query log-sum-exp of the scores, a block of queries at a time."""
  outs, lses = [], []
  for start, end, k_start in query_blocks(q_bkgth.shape[3], block, window):
    scores_bkgqs = _block_scores(q_bkgth[:, :, :, start:end], k_bkht[..., k_start:end],
                                 valid_bt[:, k_start:end], start, k_start, window, scale)
    max_bkgq = jnp.max(scores_bkgqs, axis=-1)
    weights_bkgqs = jnp.exp(scores_bkgqs - max_bkgq[..., None])
    sum_bkgq = jnp.sum(weights_bkgqs, axis=-1)
    out_bkgqh = jnp.einsum("bkgqs,bkhs->bkgqh", weights_bkgqs.astype(v_bkht.dtype),
                           v_bkht[..., k_start:end]).astype(jnp.float32) / sum_bkgq[..., None]
    outs.append(out_bkgqh.astype(q_bkgth.dtype))
    lses.append(max_bkgq + jnp.log(sum_bkgq))
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise_attention(q_bkgth, k_bkht, v_bkht, valid_bt, window: int, block: int, scale: float):
  return _blockwise_forward(q_bkgth, k_bkht, v_bkht, valid_bt, window, block, scale)[0]


def _blockwise_attention_fwd(q_bkgth, k_bkht, v_bkht, valid_bt, window, block, scale):
  out_bkgth, lse_bkgt = _blockwise_forward(q_bkgth, k_bkht, v_bkht, valid_bt, window, block, scale)
  return out_bkgth, (q_bkgth, k_bkht, v_bkht, valid_bt, out_bkgth, lse_bkgt)


def _blockwise_attention_bwd(window, block, scale, residuals, dout_bkgth):
  """Each block's probabilities recomputed from its scores and the saved log-sum-exp."""
  q_bkgth, k_bkht, v_bkht, valid_bt, out_bkgth, lse_bkgt = residuals
  # d(softmax) needs each query's sum over keys of p * dp, which is dout . out
  delta_bkgt = jnp.sum(dout_bkgth.astype(jnp.float32) * out_bkgth.astype(jnp.float32), axis=-1)
  dq_blocks = []
  dk_bkht = jnp.zeros(k_bkht.shape, jnp.float32)
  dv_bkht = jnp.zeros(v_bkht.shape, jnp.float32)
  for start, end, k_start in query_blocks(q_bkgth.shape[3], block, window):
    q_bkgqh, dout_bkgqh = q_bkgth[:, :, :, start:end], dout_bkgth[:, :, :, start:end]
    k_bkhs, v_bkhs = k_bkht[..., k_start:end], v_bkht[..., k_start:end]
    scores_bkgqs = _block_scores(q_bkgqh, k_bkhs, valid_bt[:, k_start:end], start, k_start, window,
                                 scale)
    probs_bkgqs = jnp.exp(scores_bkgqs - lse_bkgt[:, :, :, start:end, None])
    dv_bkhs = jnp.einsum("bkgqh,bkgqs->bkhs", dout_bkgqh, probs_bkgqs.astype(dout_bkgqh.dtype))
    dv_bkht = dv_bkht.at[..., k_start:end].add(dv_bkhs)
    dprobs_bkgqs = jnp.einsum("bkgqh,bkhs->bkgqs", dout_bkgqh, v_bkhs).astype(jnp.float32)
    dscores_bkgqs = (probs_bkgqs * (dprobs_bkgqs - delta_bkgt[:, :, :, start:end, None])
                     * scale).astype(q_bkgqh.dtype)
    dq_blocks.append(jnp.einsum("bkgqs,bkhs->bkgqh", dscores_bkgqs, k_bkhs))
    dk_bkhs = jnp.einsum("bkgqh,bkgqs->bkhs", q_bkgqh, dscores_bkgqs)
    dk_bkht = dk_bkht.at[..., k_start:end].add(dk_bkhs)
  dq_bkgth = jnp.concatenate(dq_blocks, axis=3)
  return dq_bkgth, dk_bkht.astype(k_bkht.dtype), dv_bkht.astype(v_bkht.dtype), None


_blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd)


def blockwise_causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window: int = 0,
                               block: int = ATTENTION_BLOCK):
  """Causal grouped-query self-attention a block of queries at a time, each block reading only
  the keys at or before its last query (the masked upper triangle is never computed), with a
  flash-attention-style gradient: only the output and each query's log-sum-exp are kept, each
  block's probabilities recomputed from its scores. Scores in float32, [batch, heads, block,
  keys] per block rather than [batch, heads, tokens, tokens] (XLA may keep the unrolled blocks'
  buffers live together; the planner counts them all). Keys and values are laid out [batch,
  kv_heads, head_dim, tokens]: every matmul of the pass, forward and backward, then reads its
  operands in the order XLA:CPU's matmul takes without a copy."""
  b, t, n, h = q_btnh.shape
  kv_heads = k_btkh.shape[2]
  q_bkgth = q_btnh.astype(dtype).reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  k_bkht, v_bkht = (x.astype(dtype).transpose(0, 2, 3, 1) for x in (k_btkh, v_btkh))
  out_bkgth = _blockwise_attention(q_bkgth, k_bkht, v_bkht, valid_bt, window, block, h**-0.5)
  return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window: int = 0):
  """Self-attention over the tokens themselves, with no cache (training): causal, keys at
  padding masked, grouped-query. On CPU the blockwise form (no fused kernel there); elsewhere
  `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU where it applies)."""
  if jax.default_backend() == "cpu":
    return blockwise_causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window)
  return jax.nn.dot_product_attention(q_btnh.astype(dtype), k_btkh.astype(dtype),
                                      v_btkh.astype(dtype), mask=valid_bt[:, None,
                                                                          None, :], is_causal=True,
                                      local_window_size=(window - 1, 0) if window else None)


def attend(q_btnh, k_btkh, v_btkh, valid_bt, kv: LayerKV | KeptKV | None, dtype, window: int = 0):
  """Attention for one layer: with the cache's `kv`, the new keys and values are written into it
  (`cached_attention`); without one (training), tokens attend causally to themselves (`valid_bt`
  masks padding) and nothing is stored but, with a `KeptKV`, its first tokens' keys and values.
  Returns (out, kv)."""
  query, key, value, attention = ATTENTION_NAMES
  q_btnh = tag(constrain(q_btnh, ("batch", "length", "heads", "head_dim")), query)
  k_btkh = tag(constrain(k_btkh, ("batch", "length", "kv_heads", "head_dim")), key)
  v_btkh = tag(constrain(v_btkh, ("batch", "length", "kv_heads", "head_dim")), value)
  if kv is None or isinstance(kv, KeptKV):
    out_btnh = causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window)
    if kv is not None:
      first = lambda x_btkh: jnp.swapaxes(x_btkh[:, :kv.length], 1, 2).astype(dtype)
      kv = kv.replace(k_bksh=first(k_btkh), v_bksh=first(v_btkh))
  else:
    out_btnh, kv = cached_attention(q_btnh, k_btkh, v_btkh, kv, dtype)
  out_btnh = constrain(out_btnh, ("batch", "length", "heads", "head_dim"))
  return tag(out_btnh, attention), kv


LAYERS = "layers"  # the stacked layers' key in a scanned model's parameters

# What a block keeps for the backward pass (model.remat): 'none' everything; 'full' only its
# input (the block is recomputed); 'minimal' the weight matmuls' outputs (norms, rotary,
# attention and activations recomputed); 'save_attention' the rotated query/key, the value and
# the attention output (tagged with `checkpoint_name`), so attention is not recomputed.
ATTENTION_NAMES = ("query", "key", "value", "attention")


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"config field model.remat: {name!r} is not one of {list(REMAT_POLICIES)}")
  policies = jax.checkpoint_policies
  return {
      "full": policies.nothing_saveable,
      "minimal": policies.dots_with_no_batch_dims_saveable,
      "save_attention": policies.save_only_these_names(*ATTENTION_NAMES),
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

  def __call__(self, x_btd, positions_bt, valid_bt, shared, layer: _LayerCache | None):
    kv = KeptKV(self.keep_kv) if self.keep_kv else None
    if layer is not None:
      index, mask_bts, context_masks = shared
      kv = LayerKV(layer.k_bksh, layer.v_bksh, index, mask_bts, layer.context_k, layer.context_v,
                   context_masks)
    x_btd, kv = self.block(x_btd, positions_bt, valid_bt, kv)
    return constrain(x_btd, RESIDUAL), None if kv is None else (kv.k_bksh, kv.v_bksh)


def _scan_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, shared, layer, keep_kv=0):
  body = _ScannedLayer
  if cfg.remat != "none":
    body = nn.remat(body, policy=remat_policy(cfg.remat), prevent_cse=False)
  scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.n_layers,
                    metadata_params={nn.PARTITION_NAME: LAYERS})
  return scanned(block_cls, cfg, keep_kv, name=LAYERS)(x_btd, positions_bt, valid_bt, shared, layer)


def run_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, cache: KVCache | None,
               window: int = 0, keep_kv: int = 0):
  """The layer stack shared by every family: `cfg.n_layers` blocks, each called as
  `block(x, positions, valid, kv)` and rematerialised by `cfg.remat`'s policy; with
  `cfg.scan_layers` one block body under `nn.scan` over stacked parameters (`layers/...`: one
  compile of one layer, whatever the depth), else blocks named layer_i. With a cache (stacked
  per layer when scanned), masks come from its slots and its contexts, and the updated cache is
  returned; without one (training), tokens attend causally to themselves, no keys or values
  are kept and the returned cache is None, or with `keep_kv` > 0 it holds the first `keep_kv`
  tokens' keys and values (a filled cache of that many slots). Call it from inside a compact
  method."""
  scan = cfg.scan_layers
  if cache is None:
    if scan:
      x_btd, kept = _scan_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, None, None, keep_kv)
    else:
      block = block_cls
      if cfg.remat != "none":
        block = nn.remat(block_cls, policy=remat_policy(cfg.remat))
      kept_k, kept_v = [], []
      for layer in range(cfg.n_layers):
        x_btd, kv = block(cfg, name=f"layer_{layer}")(x_btd, positions_bt, valid_bt,
                                                      KeptKV(keep_kv) if keep_kv else None)
        x_btd = constrain(x_btd, RESIDUAL)
        if keep_kv:
          kept_k.append(kv.k_bksh)
          kept_v.append(kv.v_bksh)
      kept = (tuple(kept_k), tuple(kept_v))
    if not keep_kv:
      return x_btd, None
    return x_btd, KVCache(kept[0], kept[1], valid_bt[:, :keep_kv], jnp.asarray(keep_kv, jnp.int32))
  t = x_btd.shape[1]
  valid_bs = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, valid_bt, cache.index, axis=1)
  mask_bts = attention_mask(valid_bs, cache.index, t, window)
  context_masks = tuple(context_mask(c.positions_gs, positions_bt, window) for c in cache.context)
  if scan:
    layer = _LayerCache(cache.keys, cache.values, tuple(c.keys for c in cache.context),
                        tuple(c.values for c in cache.context))
    x_btd, (keys, values) = _scan_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt,
                                         (cache.index, mask_bts, context_masks), layer)
  else:
    keys, values = [], []
    for layer in range(cfg.n_layers):
      kv = LayerKV(cache.keys[layer], cache.values[layer], cache.index, mask_bts,
                   tuple(c.keys[layer] for c in cache.context),
                   tuple(c.values[layer] for c in cache.context), context_masks)
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
  stack = stack or (lambda _, parts: np.stack(parts)
                    if isinstance(parts[0], np.ndarray) else jnp.stack(parts))
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
