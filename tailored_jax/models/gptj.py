"""GPT-J (the paper's student) in Flax Linen: one LayerNorm feeding attention and MLP in parallel,
rotary embedding on the first `rotary_dim` dims of each head (interleaved pairs), GELU MLP with
biases, untied LM head with bias. Same call signature and logical axes as `llama.Llama`.
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
class GPTJConfig(Execution):
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  rotary_dim: int
  norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def n_kv_heads(self) -> int:
    return self.n_heads

  def __post_init__(self):
    if self.d_model % self.n_heads or self.rotary_dim > self.d_model // self.n_heads:
      raise ValueError(
          f"GPT-J: n_embd={self.d_model}, n_head={self.n_heads} and "
          f"rotary_dim={self.rotary_dim} do not fit"
      )


def apply_interleaved_rope(x_bthd, positions_bt, rotary_dim: int):
  """GPT-J rotary: pairs (0,1), (2,3)… of the first `rotary_dim` dims rotate; the rest pass."""
  rot, rest = x_bthd[..., :rotary_dim], x_bthd[..., rotary_dim:]
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
  angle_btr = positions_bt[:, :, None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None]
  sin = jnp.repeat(jnp.sin(angle_btr), 2, axis=-1)[:, :, None, :]
  cos = jnp.repeat(jnp.cos(angle_btr), 2, axis=-1)[:, :, None, :]
  rot32 = rot.astype(jnp.float32)
  rotated = jnp.stack([-rot32[..., 1::2], rot32[..., ::2]], axis=-1).reshape(rot32.shape)
  out = rot32 * cos + rotated * sin
  return jnp.concatenate([out.astype(x_bthd.dtype), rest], axis=-1)


class LayerNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = param(self, "scale", (d,), ("norm",), self.param_dtype, nn.initializers.ones)
    bias = param(self, "bias", (d,), ("norm",), self.param_dtype, nn.initializers.zeros)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class GPTJBlock(nn.Module):
  cfg: GPTJConfig

  @nn.compact
  def __call__(self, x_btd, positions_bt, valid_bt, kv: LayerKV | None):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
    normal = lambda fan_in: nn.initializers.normal(stddev=fan_in**-0.5)
    h_btd = LayerNorm(cfg.norm_eps, dt, pdt, name="ln")(x_btd)
    wq = weight(self, "wq", (d, n, h), ("embed", "heads", "head_dim"), normal(d), cfg)
    wk = weight(self, "wk", (d, n, h), ("embed", "kv_heads", "head_dim"), normal(d), cfg)
    wv = weight(self, "wv", (d, n, h), ("embed", "kv_heads", "head_dim"), normal(d), cfg)
    wo = weight(self, "wo", (n, h, d), ("heads", "head_dim", "embed"), normal(d), cfg)
    q_btnh = apply_interleaved_rope(
        projection(self, "wq", "q", h_btd, wq, 1, ("embed", "heads", "head_dim"), cfg),
        positions_bt,
        cfg.rotary_dim,
    )
    k_btnh = apply_interleaved_rope(
        projection(self, "wk", "k", h_btd, wk, 1, ("embed", "kv_heads", "head_dim"), cfg),
        positions_bt,
        cfg.rotary_dim,
    )
    v_btnh = projection(self, "wv", "v", h_btd, wv, 1, ("embed", "kv_heads", "head_dim"), cfg)
    out_btnh, kv = attend(
        q_btnh,
        k_btnh,
        v_btnh,
        valid_bt,
        kv,
        dt,
        implementation=cfg.attention,
        native_decode=native_decode(cfg),
    )
    attn_btd = projection(
        self, "wo", "o", merge_heads(out_btnh), wo, 2, ("heads", "head_dim", "embed"), cfg
    )
    w_in = weight(self, "w_in", (d, cfg.d_ff), ("embed", "mlp"), normal(d), cfg)
    b_in = param(self, "b_in", (cfg.d_ff,), ("mlp",), pdt, nn.initializers.zeros)
    w_out = weight(self, "w_out", (cfg.d_ff, d), ("mlp", "embed"), normal(cfg.d_ff), cfg)
    b_out = param(self, "b_out", (d,), ("norm",), pdt, nn.initializers.zeros)
    ff_btf = jax.nn.gelu(
        constrain(
            projection(self, "w_in", "up", h_btd, w_in, 1, ("embed", "mlp"), cfg) + b_in.astype(dt),
            MLP_HIDDEN,
        ),
        approximate=True,
    )
    mlp_btd = projection(
        self, "w_out", "down", ff_btf, w_out, 1, ("mlp", "embed"), cfg
    ) + b_out.astype(dt)
    return x_btd + attn_btd + mlp_btd, kv


class GPTJ(nn.Module):
  """(tokens, positions, valid, cache) -> (logits_btv float32, hidden after ln_f, cache); with
  `with_logits=False` the logits are None (the loss applies `head_logits` in chunks); without a
  cache, `keep_kv` > 0 returns the first `keep_kv` tokens' keys and values as the cache."""

  cfg: GPTJConfig

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
        nn.initializers.normal(stddev=cfg.d_model**-0.5),
    )
    x_btd = constrain(jnp.take(embedding_vd, tokens_bt, axis=0).astype(dt), RESIDUAL)
    x_btd, new_cache = run_blocks(
        GPTJBlock, cfg, x_btd, positions_bt, valid_bt, cache, keep_kv=keep_kv
    )
    hidden_btd = LayerNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x_btd)
    head_dv = param(
        self,
        "lm_head",
        (cfg.d_model, cfg.vocab_size),
        ("embed", "vocab"),
        pdt,
        nn.initializers.normal(stddev=cfg.d_model**-0.5),
    )
    head_bias_v = param(
        self, "lm_head_bias", (cfg.vocab_size,), ("vocab",), pdt, nn.initializers.zeros
    )
    head = {"lm_head": head_dv, "lm_head_bias": head_bias_v}
    logits_btv = head_logits(head, hidden_btd, cfg) if with_logits else None
    return logits_btv, hidden_btd, new_cache


def head_logits(params, hidden_btd, cfg: GPTJConfig):
  """The biased LM head on hidden states, float32 logits; `params` is the parameter tree (or the
  part holding the head)."""
  dt = jnp.dtype(cfg.dtype)
  logits_btv = dense(hidden_btd, params["lm_head"].astype(dt), cfg.platform) + params[
      "lm_head_bias"
  ].astype(dt)
  return constrain(logits_btv.astype(jnp.float32), LOGITS)


# ---- Hugging Face interchange ------------------------------------------------------------------
HF_MODEL_TYPES = ("gptj",)


def from_hf_config(hf: dict, model_type: str) -> GPTJConfig:
  """Our config from an HF config dict (KeyError names a missing field, ValueError the rest)."""
  del model_type
  if hf.get("activation_function", "gelu_new") != "gelu_new":
    raise ValueError(
        f"activation_function {hf['activation_function']!r} is not supported (gelu_new)"
    )
  return GPTJConfig(
      vocab_size=hf["vocab_size"],
      d_model=hf["n_embd"],
      n_layers=hf["n_layer"],
      n_heads=hf["n_head"],
      d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
      rotary_dim=hf.get("rotary_dim") or hf["n_embd"] // hf["n_head"],
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
  )


def to_hf_config(cfg: GPTJConfig, model_type: str) -> dict:
  del model_type
  return {
      "architectures": ["GPTJForCausalLM"],
      "model_type": "gptj",
      "vocab_size": cfg.vocab_size,
      "n_embd": cfg.d_model,
      "n_layer": cfg.n_layers,
      "n_head": cfg.n_heads,
      "n_inner": cfg.d_ff,
      "rotary_dim": cfg.rotary_dim,
      "n_positions": 2048,
      "activation_function": "gelu_new",
      "layer_norm_epsilon": cfg.norm_eps,
      "tie_word_embeddings": False,
  }


def hf_tensors(cfg: GPTJConfig) -> dict[str, HFTensor]:
  """HF name -> (our path, HF shape, HF->ours, ours->HF) for every GPT-J tensor."""
  d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  same = lambda w: w
  transpose = lambda w: w.T
  table = {
      "transformer.wte.weight": HFTensor(("embedding",), (v, d), same, same),
      "transformer.ln_f.weight": HFTensor(("final_norm", "scale"), (d,), same, same),
      "transformer.ln_f.bias": HFTensor(("final_norm", "bias"), (d,), same, same),
      "lm_head.weight": HFTensor(("lm_head",), (v, d), transpose, transpose),
      "lm_head.bias": HFTensor(("lm_head_bias",), (v,), same, same),
  }
  for i in range(cfg.n_layers):
    p, layer = f"transformer.h.{i}.", f"layer_{i}"
    table.update(
        {
            p + "ln_1.weight": HFTensor((layer, "ln", "scale"), (d,), same, same),
            p + "ln_1.bias": HFTensor((layer, "ln", "bias"), (d,), same, same),
            p + "mlp.fc_in.weight": HFTensor((layer, "w_in"), (f, d), transpose, transpose),
            p + "mlp.fc_in.bias": HFTensor((layer, "b_in"), (f,), same, same),
            p + "mlp.fc_out.weight": HFTensor((layer, "w_out"), (d, f), transpose, transpose),
            p + "mlp.fc_out.bias": HFTensor((layer, "b_out"), (d,), same, same),
            p
            + "attn.out_proj.weight": HFTensor(
                (layer, "wo"),
                (d, d),
                lambda w: w.T.reshape(n, h, d),
                lambda w: w.reshape(n * h, d).T,
            ),
        }
    )
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
      table[p + f"attn.{theirs}.weight"] = HFTensor(
          (layer, ours), (d, d), lambda w: w.T.reshape(d, n, h), lambda w: w.reshape(d, n * h).T
      )
  return table
