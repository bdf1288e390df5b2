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

from tailored_jax.models.annotations import constrain
from tailored_jax.models.attention.cached import LayerKV
from tailored_jax.models.attention.dispatch import attend, native_decode
from tailored_jax.models.kv_cache import KVCache
from tailored_jax.models.quantize import weight
from tailored_jax.models.layers import (
    LOGITS,
    MLP_HIDDEN,
    RESIDUAL,
    Execution,
    HFTensor,
    dense,
    merge_heads,
    param,
    projection,
    run_blocks,
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(Execution):
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
  qkv_bias: bool = False  # Qwen2
  sliding_window: int = 0  # Mistral; 0: full causal attention
  rope_scaling: str = ""  # "" or "llama3"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"model.n_heads={self.n_heads} is not a multiple of "
          f"model.n_kv_heads={self.n_kv_heads}"
      )


def _normal(stddev: float):
  return nn.initializers.normal(stddev=stddev)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = param(self, "scale", (x.shape[-1],), ("norm",), self.param_dtype, nn.initializers.ones)
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
    smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
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
  def __call__(self, x_btd, positions_bt, valid_bt, kv: LayerKV | None):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    scale = cfg.d_model**-0.5
    wq = weight(
        self,
        "wq",
        (cfg.d_model, cfg.n_heads, cfg.head_dim),
        ("embed", "heads", "head_dim"),
        _normal(scale),
        cfg,
    )
    wk = weight(
        self,
        "wk",
        (cfg.d_model, cfg.n_kv_heads, cfg.head_dim),
        ("embed", "kv_heads", "head_dim"),
        _normal(scale),
        cfg,
    )
    wv = weight(
        self,
        "wv",
        (cfg.d_model, cfg.n_kv_heads, cfg.head_dim),
        ("embed", "kv_heads", "head_dim"),
        _normal(scale),
        cfg,
    )
    wo = weight(
        self,
        "wo",
        (cfg.n_heads, cfg.head_dim, cfg.d_model),
        ("heads", "head_dim", "embed"),
        _normal((cfg.n_heads * cfg.head_dim) ** -0.5),
        cfg,
    )
    x_btd = x_btd.astype(dt)
    q_btnh = projection(self, "wq", "q", x_btd, wq, 1, ("embed", "heads", "head_dim"), cfg)
    k_btkh = projection(self, "wk", "k", x_btd, wk, 1, ("embed", "kv_heads", "head_dim"), cfg)
    v_btkh = projection(self, "wv", "v", x_btd, wv, 1, ("embed", "kv_heads", "head_dim"), cfg)
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_btnh += param(
          self, "bq", (cfg.n_heads, cfg.head_dim), ("heads", "head_dim"), pdt, zeros
      ).astype(dt)
      k_btkh += param(
          self, "bk", (cfg.n_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"), pdt, zeros
      ).astype(dt)
      v_btkh += param(
          self, "bv", (cfg.n_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"), pdt, zeros
      ).astype(dt)
    inv_freq_h = jnp.asarray(rope_inv_freq(cfg))
    q_btnh = apply_rope(q_btnh, positions_bt, inv_freq_h)
    k_btkh = apply_rope(k_btkh, positions_bt, inv_freq_h)

    out_btnh, kv = attend(
        q_btnh,
        k_btkh,
        v_btkh,
        valid_bt,
        kv,
        dt,
        cfg.sliding_window,
        cfg.attention,
        native_decode(cfg),
    )
    out_btd = projection(
        self, "wo", "o", merge_heads(out_btnh), wo, 2, ("heads", "head_dim", "embed"), cfg
    )
    return out_btd, kv


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_btd):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    w_gate = weight(
        self, "w_gate", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), _normal(cfg.d_model**-0.5), cfg
    )
    w_up = weight(
        self, "w_up", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), _normal(cfg.d_model**-0.5), cfg
    )
    w_down = weight(
        self, "w_down", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), _normal(cfg.d_ff**-0.5), cfg
    )
    x_btd = x_btd.astype(dt)
    in_out, out_in = ("embed", "mlp"), ("mlp", "embed")
    gate_btf = projection(self, "w_gate", "gate", x_btd, w_gate, 1, in_out, cfg)
    gate_btf = jax.nn.silu(constrain(gate_btf, MLP_HIDDEN))
    up_btf = constrain(projection(self, "w_up", "up", x_btd, w_up, 1, in_out, cfg), MLP_HIDDEN)
    return projection(self, "w_down", "down", gate_btf * up_btf, w_down, 1, out_in, cfg)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_btd, positions_bt, valid_bt, kv: LayerKV | None):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h_btd, kv = Attention(cfg, name="attn")(
        RMSNorm(cfg.norm_eps, dt, pdt, name="attn_norm")(x_btd), positions_bt, valid_bt, kv
    )
    x_btd = x_btd + h_btd
    x_btd = x_btd + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, dt, pdt, name="mlp_norm")(x_btd))
    return x_btd, kv


class Llama(nn.Module):
  """Forward over new tokens given a KV cache (fresh if None).

  Returns (logits_btv float32, hidden_btd after the final norm, updated cache); with
  `with_logits=False` the logits are None (the loss applies `head_logits` in chunks). Without a
  cache, `keep_kv` > 0 returns the first `keep_kv` tokens' keys and values as the cache.
  """

  cfg: LlamaConfig

  @nn.compact
  def __call__(
      self,
      tokens_bt,
      positions_bt,
      valid_bt,
      cache: KVCache | None = None,
      with_logits: bool = True,
      keep_kv: int = 0,
  ):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embedding_vd = param(
        self,
        "embedding",
        (cfg.vocab_size, cfg.d_model),
        ("vocab", "embed"),
        pdt,
        _normal(cfg.d_model**-0.5),
    )
    x_btd = constrain(jnp.take(embedding_vd, tokens_bt, axis=0).astype(dt), RESIDUAL)
    x_btd, new_cache = run_blocks(
        Block, cfg, x_btd, positions_bt, valid_bt, cache, cfg.sliding_window, keep_kv
    )
    hidden_btd = RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x_btd)
    head = {"embedding": embedding_vd}
    if not cfg.tie_embeddings:
      head["lm_head"] = param(
          self,
          "lm_head",
          (cfg.d_model, cfg.vocab_size),
          ("embed", "vocab"),
          pdt,
          _normal(cfg.d_model**-0.5),
      )
    logits_btv = head_logits(head, hidden_btd, cfg) if with_logits else None
    return logits_btv, hidden_btd, new_cache


def head_logits(params, hidden_btd, cfg: LlamaConfig):
  """The LM head (the embedding when tied) on hidden states, float32 logits; `params` is the
  parameter tree (or the part holding the head)."""
  dt = jnp.dtype(cfg.dtype)
  if cfg.tie_embeddings:
    logits_btv = dense(hidden_btd, params["embedding"].astype(dt).T, cfg.platform)
  else:
    logits_btv = dense(hidden_btd, params["lm_head"].astype(dt), cfg.platform)
  return constrain(logits_btv.astype(jnp.float32), LOGITS)


# ---- Hugging Face interchange (llama, mistral, qwen2) ------------------------------------------
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


def from_hf_config(hf: dict, model_type: str) -> LlamaConfig:
  """Our config from an HF config dict (KeyError names a missing field, ValueError the rest)."""
  n_heads = hf["num_attention_heads"]
  scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  rope_type = scaling.get("rope_type", scaling.get("type", "")) if scaling else ""
  if rope_type in ("default", None):
    rope_type = ""
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (silu)")
  return LlamaConfig(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
      d_ff=hf["intermediate_size"],
      rope_theta=float(hf.get("rope_theta", scaling.get("rope_theta", 10000.0))),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", model_type != "mistral")),
      qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
      sliding_window=int(hf.get("sliding_window") or 0)
      if (model_type == "mistral" or hf.get("use_sliding_window"))
      else 0,
      rope_scaling=rope_type,
      rope_factor=float(scaling.get("factor", 1.0)),
      rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
      rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
      rope_original_max_positions=int(scaling.get("original_max_position_embeddings", 8192)),
  )


def to_hf_config(cfg: LlamaConfig, model_type: str) -> dict:
  arch = {
      "llama": "LlamaForCausalLM",
      "mistral": "MistralForCausalLM",
      "qwen2": "Qwen2ForCausalLM",
  }[model_type]
  out = {
      "architectures": [arch],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "intermediate_size": cfg.d_ff,
      "hidden_act": "silu",
      "rope_theta": cfg.rope_theta,
      "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": 32768,
  }
  if model_type == "llama":
    out["attention_bias"] = cfg.qkv_bias
    out["mlp_bias"] = False
  if cfg.sliding_window:
    out["sliding_window"] = cfg.sliding_window
    if model_type == "qwen2":
      out["use_sliding_window"] = True
  if cfg.rope_scaling == "llama3":
    out["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": cfg.rope_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_positions,
    }
  return out


def hf_tensors(cfg: LlamaConfig) -> dict[str, HFTensor]:
  """HF name -> (our path, HF shape, HF->ours, ours->HF) for every tensor of the checkpoint."""
  d, n, k, h, f, v = (
      cfg.d_model,
      cfg.n_heads,
      cfg.n_kv_heads,
      cfg.head_dim,
      cfg.d_ff,
      cfg.vocab_size,
  )
  same = lambda w: w
  transpose = lambda w: w.T
  table = {
      "model.embed_tokens.weight": HFTensor(("embedding",), (v, d), same, same),
      "model.norm.weight": HFTensor(("final_norm", "scale"), (d,), same, same),
  }
  if not cfg.tie_embeddings:
    table["lm_head.weight"] = HFTensor(("lm_head",), (v, d), transpose, transpose)
  for i in range(cfg.n_layers):
    p, layer = f"model.layers.{i}.", f"layer_{i}"
    table.update(
        {
            p + "input_layernorm.weight": HFTensor((layer, "attn_norm", "scale"), (d,), same, same),
            p
            + "post_attention_layernorm.weight": HFTensor(
                (layer, "mlp_norm", "scale"), (d,), same, same
            ),
            p
            + "self_attn.o_proj.weight": HFTensor(
                (layer, "attn", "wo"),
                (d, n * h),
                lambda w: w.T.reshape(n, h, d),
                lambda w: w.reshape(n * h, d).T,
            ),
            p
            + "mlp.gate_proj.weight": HFTensor(
                (layer, "mlp", "w_gate"), (f, d), transpose, transpose
            ),
            p
            + "mlp.up_proj.weight": HFTensor((layer, "mlp", "w_up"), (f, d), transpose, transpose),
            p
            + "mlp.down_proj.weight": HFTensor(
                (layer, "mlp", "w_down"), (d, f), transpose, transpose
            ),
        }
    )
    for ours, theirs, heads in (("q", "q_proj", n), ("k", "k_proj", k), ("v", "v_proj", k)):
      table[p + f"self_attn.{theirs}.weight"] = HFTensor(
          (layer, "attn", f"w{ours}"),
          (heads * h, d),
          lambda w, heads=heads: w.T.reshape(d, heads, h),
          lambda w, heads=heads: w.reshape(d, heads * h).T,
      )
      if cfg.qkv_bias:
        table[p + f"self_attn.{theirs}.bias"] = HFTensor(
            (layer, "attn", f"b{ours}"),
            (heads * h,),
            lambda w, heads=heads: w.reshape(heads, h),
            lambda w: w.reshape(-1),
        )
  return table
