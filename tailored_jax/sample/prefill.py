"""Prefill: a prompt's keys and values computed in one forward pass, for the decode loops to read
as contexts (static `decode.generate` and continuous `continuous.insert` share it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tailored_jax.models import head_logits
from tailored_jax.models.kv_cache import Context, KVCache, cache_dtype


def prefill_prefix(params, prefix_p, *, model) -> Context:
  """Keys and values of a prefix (no padding) that every prompt of a batch starts with."""
  cfg = model.cfg
  p = prefix_p.shape[0]
  cache = KVCache.zeros(cfg.n_layers, 1, p, cfg.n_kv_heads, cfg.head_dim, cache_dtype(cfg))
  _, _, cache = model.apply(
      {"params": params},
      prefix_p[None],
      jnp.arange(p)[None],
      jnp.ones((1, p), bool),
      cache,
      with_logits=False,
  )
  return cache.as_context(jnp.arange(p)[None])


def prefill_prompts(
    params, prompt_bp, prompt_valid_bp, prefix: Context | None, *, model
) -> tuple[jax.Array, Context, jax.Array]:
  """Left-padded prompts (the tokens after the shared `prefix`, if any) prefilled: returns their
  next-token logits [B, V], their keys and values as a context with one group per prompt
  (positions -1 at padding) and each prompt's first generated position [B]."""
  cfg = model.cfg
  b, p = prompt_bp.shape
  context = () if prefix is None else (prefix,)
  offset = 0 if prefix is None else prefix.length
  positions_bp = offset + jnp.maximum(jnp.cumsum(prompt_valid_bp, axis=1) - 1, 0)
  cache = KVCache.zeros(cfg.n_layers, b, p, cfg.n_kv_heads, cfg.head_dim, cache_dtype(cfg), context)
  _, hidden_bpd, cache = model.apply(
      {"params": params}, prompt_bp, positions_bp, prompt_valid_bp, cache, with_logits=False
  )
  logits_bv = head_logits(params, hidden_bpd[:, -1:], cfg)[:, 0]
  first_position_b = offset + jnp.sum(prompt_valid_bp, axis=1).astype(jnp.int32)
  return logits_bv, cache.as_context(positions_bp), first_position_b
