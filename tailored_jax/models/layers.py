"""Model pieces every family shares: the parameter helper, initialisation on dummy tokens, the
grouped-query attention core over the KV cache, the layer stack, and the HF tensor-table entry.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
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


def cached_attention(q_btnh, k_btkh, v_btkh, cache_k_bskh, cache_v_bskh, index, mask_bts, dtype,
                     scale: float | None = None):
  """Writes the new keys/values at `index`, then attends over the whole buffer (grouped-query:
  each of the k kv-heads serves n/k query heads). Softmax in float32.

  Returns (out_btnh, cache_k_bskh, cache_v_bskh).
  """
  cache_k_bskh = jax.lax.dynamic_update_slice_in_dim(cache_k_bskh,
                                                     k_btkh.astype(cache_k_bskh.dtype), index,
                                                     axis=1)
  cache_v_bskh = jax.lax.dynamic_update_slice_in_dim(cache_v_bskh,
                                                     v_btkh.astype(cache_v_bskh.dtype), index,
                                                     axis=1)
  b, t, n, h = q_btnh.shape
  kv_heads = cache_k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
  logits_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh.astype(dtype), cache_k_bskh.astype(dtype))
  logits_bkgts = logits_bkgts.astype(jnp.float32) * (h**-0.5 if scale is None else scale)
  logits_bkgts = jnp.where(mask_bts[:, None, None, :, :], logits_bkgts, -1e30)
  probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(dtype)
  out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, cache_v_bskh.astype(dtype))
  return out_btkgh.reshape(b, t, n, h), cache_k_bskh, cache_v_bskh


def causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window: int = 0):
  """Self-attention over the tokens themselves, with no cache (training): causal, keys at
  padding masked, grouped-query, the platform's fused kernel where jax has one."""
  return jax.nn.dot_product_attention(q_btnh.astype(dtype), k_btkh.astype(dtype),
                                      v_btkh.astype(dtype), mask=valid_bt[:, None,
                                                                          None, :], is_causal=True,
                                      local_window_size=(window - 1, 0) if window else None)


def attend(q_btnh, k_btkh, v_btkh, cache_k_bskh, cache_v_bskh, index, mask, dtype, window: int = 0):
  """Attention for one layer: with a cache, `mask` is [batch, new, slots] and the new keys and
  values are written into it (`cached_attention`); without one (`cache_k_bskh` None), `mask` is
  the tokens' own validity [batch, new] and nothing is stored. Returns (out, cache_k, cache_v)."""
  if cache_k_bskh is None:
    return causal_attention(q_btnh, k_btkh, v_btkh, mask, dtype, window), None, None
  return cached_attention(q_btnh, k_btkh, v_btkh, cache_k_bskh, cache_v_bskh, index, mask, dtype)


def run_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, cache: KVCache | None,
               window: int = 0):
  """The layer stack shared by every family: `cfg.n_layers` blocks named layer_i
  (rematerialised if `cfg.remat`). With a cache, the mask comes from its slots and the updated
  cache is returned; without one (training), tokens attend causally to themselves, no keys or
  values are kept, and the returned cache is None. Call it from inside a compact method."""
  block = nn.remat(block_cls) if cfg.remat else block_cls
  if cache is None:
    for layer in range(cfg.n_layers):
      x_btd, _, _ = block(cfg, name=f"layer_{layer}")(x_btd, positions_bt, valid_bt, None, None,
                                                      None)
    return x_btd, None
  t = x_btd.shape[1]
  valid_bs = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, valid_bt, cache.index, axis=1)
  mask_bts = attention_mask(valid_bs, cache.index, t, window)
  new_k, new_v = [], []
  for layer in range(cfg.n_layers):
    x_btd, k_bskh, v_bskh = block(cfg, name=f"layer_{layer}")(x_btd, positions_bt, mask_bts,
                                                              cache.k_lbskh[layer],
                                                              cache.v_lbskh[layer], cache.index)
    new_k.append(k_bskh)
    new_v.append(v_bskh)
  return x_btd, KVCache(jnp.stack(new_k), jnp.stack(new_v), valid_bs, cache.index + t)
