"""A LLaMA-family decoder in Flax Linen: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention.

Every parameter carries logical axis names (embed, heads, kv_heads, head_dim, mlp, vocab); the
mesh placement is decided by the rules in `sharding.py`, never here.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax.models.kv_cache import KVCache, cached_attention, run_blocks


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"        # activation/compute dtype
  param_dtype: str = "float32"
  remat: bool = False
  qkv_bias: bool = False           # Qwen2
  sliding_window: int = 0          # Mistral; 0: full causal attention
  rope_scaling: str = ""           # "" or "llama3"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of "
                       f"model.n_kv_heads={self.n_kv_heads}")


def _param(module, name, shape, axes, dtype, scale):
  init = nn.with_logical_partitioning(nn.initializers.normal(stddev=scale), axes)
  return module.param(name, init, shape, dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Rotary inverse frequencies, with LLaMA 3's long-context rescaling when configured."""
  half = cfg.head_dim // 2
  exponent = np.arange(half, dtype=np.float32) / np.float32(half)
  inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
  if cfg.rope_scaling == "llama3":
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    smooth = ((cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  elif cfg.rope_scaling:
    raise ValueError(f"unsupported rope_scaling {cfg.rope_scaling!r}; supported: llama3")
  return inv_freq.astype(np.float32)


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq_h) -> jax.Array:
  """Rotary embedding, half-split layout (HF's rotate_half)."""
  angle_bth = positions_bt[:, :, None].astype(jnp.float32) * inv_freq_h[None, None, :]
  cos, sin = jnp.cos(angle_bth)[:, :, None, :], jnp.sin(angle_bth)[:, :, None, :]
  x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthd.dtype)


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_btd, positions_bt, mask_bts, cache_k_bskh, cache_v_bskh, index):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    scale = cfg.d_model ** -0.5
    wq = _param(self, "wq", (cfg.d_model, cfg.n_heads, cfg.head_dim),
                ("embed", "heads", "head_dim"), pdt, scale)
    wk = _param(self, "wk", (cfg.d_model, cfg.n_kv_heads, cfg.head_dim),
                ("embed", "kv_heads", "head_dim"), pdt, scale)
    wv = _param(self, "wv", (cfg.d_model, cfg.n_kv_heads, cfg.head_dim),
                ("embed", "kv_heads", "head_dim"), pdt, scale)
    wo = _param(self, "wo", (cfg.n_heads, cfg.head_dim, cfg.d_model),
                ("heads", "head_dim", "embed"), pdt, (cfg.n_heads * cfg.head_dim) ** -0.5)
    x_btd = x_btd.astype(dt)
    q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, wq.astype(dt))
    k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, wk.astype(dt))
    v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, wv.astype(dt))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_btnh += self.param("bq", nn.with_logical_partitioning(zeros, ("heads", "head_dim")),
                           (cfg.n_heads, cfg.head_dim), pdt).astype(dt)
      k_btkh += self.param("bk", nn.with_logical_partitioning(zeros, ("kv_heads", "head_dim")),
                           (cfg.n_kv_heads, cfg.head_dim), pdt).astype(dt)
      v_btkh += self.param("bv", nn.with_logical_partitioning(zeros, ("kv_heads", "head_dim")),
                           (cfg.n_kv_heads, cfg.head_dim), pdt).astype(dt)
    inv_freq_h = jnp.asarray(rope_inv_freq(cfg))
    q_btnh = apply_rope(q_btnh, positions_bt, inv_freq_h)
    k_btkh = apply_rope(k_btkh, positions_bt, inv_freq_h)

    out_btnh, cache_k_bskh, cache_v_bskh = cached_attention(
        q_btnh, k_btkh, v_btkh, cache_k_bskh, cache_v_bskh, index, mask_bts, dt)
    out_btd = jnp.einsum("btnh,nhd->btd", out_btnh, wo.astype(dt))
    return out_btd, cache_k_bskh, cache_v_bskh


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_btd):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    w_gate = _param(self, "w_gate", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), pdt,
                    cfg.d_model ** -0.5)
    w_up = _param(self, "w_up", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), pdt,
                  cfg.d_model ** -0.5)
    w_down = _param(self, "w_down", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), pdt,
                    cfg.d_ff ** -0.5)
    x_btd = x_btd.astype(dt)
    gate_btf = jax.nn.silu(x_btd @ w_gate.astype(dt))
    return (gate_btf * (x_btd @ w_up.astype(dt))) @ w_down.astype(dt)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_btd, positions_bt, mask_bts, cache_k_bskh, cache_v_bskh, index):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h_btd, cache_k_bskh, cache_v_bskh = Attention(cfg, name="attn")(
        RMSNorm(cfg.norm_eps, dt, pdt, name="attn_norm")(x_btd), positions_bt, mask_bts,
        cache_k_bskh, cache_v_bskh, index)
    x_btd = x_btd + h_btd
    x_btd = x_btd + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, dt, pdt, name="mlp_norm")(x_btd))
    return x_btd, cache_k_bskh, cache_v_bskh


class Llama(nn.Module):
  """Forward over new tokens given a KV cache (fresh if None).

  Returns (logits_btv float32, hidden_btd after the final norm, updated cache).
  """
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens_bt, positions_bt, valid_bt, cache: KVCache | None = None):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embedding_vd = _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                          pdt, cfg.d_model ** -0.5)
    x_btd = jnp.take(embedding_vd, tokens_bt, axis=0).astype(dt)
    x_btd, new_cache = run_blocks(Block, cfg, x_btd, positions_bt, valid_bt, cache,
                                  cfg.sliding_window)
    hidden_btd = RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x_btd)
    if cfg.tie_embeddings:
      logits_btv = jnp.einsum("btd,vd->btv", hidden_btd, embedding_vd.astype(dt))
    else:
      head_dv = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt,
                       cfg.d_model ** -0.5)
      logits_btv = hidden_btd @ head_dv.astype(dt)
    return logits_btv.astype(jnp.float32), hidden_btd, new_cache
