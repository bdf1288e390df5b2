"""Model pieces every family shares: the parameter helper, initialisation on dummy tokens, the
grouped-query attention core over the KV cache and its contexts, the layer stack, and the
HF tensor-table entry.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax.models.kv_cache import KVCache

NEG_INF = -1e30


def param(module: nn.Module, name: str, shape: tuple, axes: tuple, dtype, init) -> jax.Array:
  """A parameter carrying logical axis names (placed on the mesh by `sharding.py`'s rules)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def init_boxed_params(model: nn.Module, key) -> dict:
  """Parameters initialised on dummy tokens, still boxed with their logical axes."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  return model.init(key, tokens, tokens, jnp.ones((1, 8), bool))["params"]


def abstract_params(model: nn.Module) -> dict:
  """Shapes and dtypes of the parameters (nothing allocated), unboxed."""
  return nn.meta.unbox(
      jax.eval_shape(lambda key: init_boxed_params(model, key), jax.random.PRNGKey(0)))


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


def merge_heads(x_btnh):
  """[batch, new, heads, head_dim] -> [batch, new, heads*head_dim], so the output projection is
  one plain matmul with its weight reshaped (no transposed copy of the weight per step)."""
  b, t, n, h = x_btnh.shape
  return x_btnh.reshape(b, t, n * h)


def causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window: int = 0):
  """Self-attention over the tokens themselves, with no cache (training): causal, keys at
  padding masked, grouped-query, the platform's fused kernel where jax has one."""
  return jax.nn.dot_product_attention(q_btnh.astype(dtype), k_btkh.astype(dtype),
                                      v_btkh.astype(dtype), mask=valid_bt[:, None,
                                                                          None, :], is_causal=True,
                                      local_window_size=(window - 1, 0) if window else None)


def attend(q_btnh, k_btkh, v_btkh, valid_bt, kv: LayerKV | None, dtype, window: int = 0):
  """Attention for one layer: with the cache's `kv`, the new keys and values are written into it
  (`cached_attention`); without one (training), tokens attend causally to themselves (`valid_bt`
  masks padding) and nothing is stored. Returns (out, kv)."""
  if kv is None:
    return causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window), None
  return cached_attention(q_btnh, k_btkh, v_btkh, kv, dtype)


def run_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, cache: KVCache | None,
               window: int = 0):
  """The layer stack shared by every family: `cfg.n_layers` blocks named layer_i
  (rematerialised if `cfg.remat`), each called as `block(x, positions, valid, kv)`. With a cache,
  masks come from its slots and its contexts, and the updated cache is returned; without
  one (training), tokens attend causally to themselves, no keys or values are kept, and the
  returned cache is None. Call it from inside a compact method."""
  block = nn.remat(block_cls) if cfg.remat else block_cls
  if cache is None:
    for layer in range(cfg.n_layers):
      x_btd, _ = block(cfg, name=f"layer_{layer}")(x_btd, positions_bt, valid_bt, None)
    return x_btd, None
  t = x_btd.shape[1]
  valid_bs = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, valid_bt, cache.index, axis=1)
  mask_bts = attention_mask(valid_bs, cache.index, t, window)
  context_masks = tuple(context_mask(c.positions_gs, positions_bt, window) for c in cache.context)
  keys, values = [], []
  for layer in range(cfg.n_layers):
    kv = LayerKV(cache.keys[layer], cache.values[layer], cache.index, mask_bts,
                 tuple(c.keys[layer] for c in cache.context),
                 tuple(c.values[layer] for c in cache.context), context_masks)
    x_btd, kv = block(cfg, name=f"layer_{layer}")(x_btd, positions_bt, valid_bt, kv)
    keys.append(kv.k_bksh)
    values.append(kv.v_bksh)
  return x_btd, cache.replace(keys=tuple(keys), values=tuple(values), valid_bs=valid_bs,
                              index=cache.index + t)
