"""Model pieces every family shares: the parameter helper, initialisation on dummy tokens, the
grouped-query attention core over the KV cache (and a shared prefix), the layer stack, and the
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


def prefix_mask(positions_bt: jax.Array, prefix_length: int, window: int = 0) -> jax.Array:
  """[batch, new, prefix]: which shared-prefix tokens (positions 0..prefix_length-1) each new
  token sees: all of them, or with a sliding `window` the ones within it."""
  key_position_p = jnp.arange(prefix_length)
  if not window:
    return jnp.ones(positions_bt.shape + (prefix_length,), bool)
  return key_position_p[None, None, :] > positions_bt[:, :, None] - window


@flax.struct.dataclass
class LayerKV:
  """What one layer's attention reads from and writes to the cache: the stacked buffers (written
  in place at [layer, :, :, index]), the masks, and the shared prefix's keys and values, if any."""
  k_lbksh: jax.Array
  v_lbksh: jax.Array
  index: jax.Array
  mask_bts: jax.Array
  prefix_k_kph: jax.Array | None = None
  prefix_v_kph: jax.Array | None = None
  prefix_mask_btp: jax.Array | None = None
  layer: int = flax.struct.field(pytree_node=False, default=0)


def cached_attention(q_btnh, k_btkh, v_btkh, kv: LayerKV, dtype, scale: float | None = None):
  """Writes the new keys/values into the layer's buffer at `index`, then attends over the shared
  prefix and the whole buffer under one softmax (grouped-query: each of the k kv-heads serves
  n/k query heads). Softmax in float32. Returns (out_btnh, kv with the buffers updated)."""
  start = (kv.layer, 0, 0, kv.index, 0)
  new_k_1bkth = jnp.swapaxes(k_btkh, 1, 2)[None].astype(kv.k_lbksh.dtype)
  new_v_1bkth = jnp.swapaxes(v_btkh, 1, 2)[None].astype(kv.v_lbksh.dtype)
  k_lbksh = jax.lax.dynamic_update_slice(kv.k_lbksh, new_k_1bkth, start)
  v_lbksh = jax.lax.dynamic_update_slice(kv.v_lbksh, new_v_1bkth, start)
  b, t, n, h = q_btnh.shape
  kv_heads = k_lbksh.shape[2]
  g = n // kv_heads
  # queries as [batch, kv_head, group*new, head_dim]: one matmul per (row, kv head)
  q_bkxh = q_btnh.reshape(b, t, kv_heads, g,
                          h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h).astype(dtype)
  scale = h**-0.5 if scale is None else scale
  k_bksh, v_bksh = k_lbksh[kv.layer].astype(dtype), v_lbksh[kv.layer].astype(dtype)
  mask_b1xs = jnp.tile(kv.mask_bts, (1, g, 1))[:, None]
  logits_bkxs = jnp.einsum("bkxh,bksh->bkxs", q_bkxh, k_bksh).astype(jnp.float32) * scale
  logits_bkxs = jnp.where(mask_b1xs, logits_bkxs, -1e30)
  if kv.prefix_k_kph is None:
    probs_bkxs = jax.nn.softmax(logits_bkxs, axis=-1).astype(dtype)
    out_bkxh = jnp.einsum("bkxs,bksh->bkxh", probs_bkxs, v_bksh)
  else:
    prefix_k_kph, prefix_v_kph = kv.prefix_k_kph.astype(dtype), kv.prefix_v_kph.astype(dtype)
    logits_bkxp = jnp.einsum("bkxh,kph->bkxp", q_bkxh, prefix_k_kph).astype(jnp.float32) * scale
    logits_bkxp = jnp.where(jnp.tile(kv.prefix_mask_btp, (1, g, 1))[:, None], logits_bkxp, -1e30)
    p = logits_bkxp.shape[-1]
    probs_bkxa = jax.nn.softmax(jnp.concatenate([logits_bkxp, logits_bkxs], axis=-1),
                                axis=-1).astype(dtype)
    out_bkxh = (jnp.einsum("bkxp,kph->bkxh", probs_bkxa[..., :p], prefix_v_kph)
                + jnp.einsum("bkxs,bksh->bkxh", probs_bkxa[..., p:], v_bksh))
  out_btnh = out_bkxh.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out_btnh, kv.replace(k_lbksh=k_lbksh, v_lbksh=v_lbksh)


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
  masks come from its slots (and its shared prefix) and the updated cache is returned; without
  one (training), tokens attend causally to themselves, no keys or values are kept, and the
  returned cache is None. Call it from inside a compact method."""
  block = nn.remat(block_cls) if cfg.remat else block_cls
  if cache is None:
    for layer in range(cfg.n_layers):
      x_btd, _ = block(cfg, name=f"layer_{layer}")(x_btd, positions_bt, valid_bt, None)
    return x_btd, None
  t = x_btd.shape[1]
  valid_bs = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, valid_bt, cache.index, axis=1)
  kv = LayerKV(cache.k_lbksh, cache.v_lbksh, cache.index,
               attention_mask(valid_bs, cache.index, t, window))
  if cache.prefix is not None:
    kv = kv.replace(prefix_mask_btp=prefix_mask(positions_bt, cache.prefix.length, window))
  for layer in range(cfg.n_layers):
    kv = kv.replace(layer=layer)
    if cache.prefix is not None:
      kv = kv.replace(prefix_k_kph=cache.prefix.k_lkph[layer],
                      prefix_v_kph=cache.prefix.v_lkph[layer])
    x_btd, kv = block(cfg, name=f"layer_{layer}")(x_btd, positions_bt, valid_bt, kv)
  return x_btd, KVCache(kv.k_lbksh, kv.v_lbksh, valid_bs, cache.index + t, cache.prefix)
