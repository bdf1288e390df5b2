"""Decoders with learned absolute positions, in Flax Linen: GPT-2, GPT-Neo and OPT (OPT-IML
shares OPT's architecture), the size study's students. Pre-LayerNorm blocks, biased attention
and MLP projections (GELU; OPT: ReLU; GPT-Neo: no q/k/v biases, unscaled attention scores, and
every other layer attending to its last `window_size` tokens only), a position table added to
the token embedding (OPT's offset by 2), LM head tied to the embedding. Same call signature and
logical axes as `llama.Llama`; the parameter names are GPT-J's, so LoRA, QLoRA and the planner
treat them alike.
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
from tailored_jax.models.gptj import LayerNorm
from tailored_jax.models.kv_cache import KVCache
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
from tailored_jax.models.quantize import weight

ACTIVATIONS = {"gelu_new": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class GPT2Config(Execution):
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  max_positions: int  # rows of the position table (OPT: its max_position_embeddings + 2)
  flavor: str = "gpt2"  # 'gpt2' | 'gpt_neo' | 'opt': the HF layout and the variant's details
  norm_eps: float = 1e-5
  local_window: int = 0  # GPT-Neo: the window of its local-attention layers
  local_layers: tuple[int, ...] = ()  # GPT-Neo: which layers attend locally
  window: int = 0  # this layer's window (set per layer by `for_layer`; 0: the whole context)

  def for_layer(self, i: int) -> "GPT2Config":
    return dataclasses.replace(self, window=self.local_window if i in self.local_layers else 0)

  @property
  def qkv_bias(self) -> bool:
    return self.flavor != "gpt_neo"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def n_kv_heads(self) -> int:
    return self.n_heads

  @property
  def tie_embeddings(self) -> bool:
    return True

  @property
  def activation(self) -> str:
    return "relu" if self.flavor == "opt" else "gelu_new"

  @property
  def position_offset(self) -> int:
    return 2 if self.flavor == "opt" else 0

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"hidden size {self.d_model} is not a multiple of {self.n_heads} heads")
    if self.flavor not in ("gpt2", "gpt_neo", "opt"):
      raise ValueError(f"flavor {self.flavor!r}: 'gpt2', 'gpt_neo' or 'opt'")


class GPT2Block(nn.Module):
  cfg: GPT2Config

  @nn.compact
  def __call__(self, x_btd, positions_bt, valid_bt, kv: LayerKV | None):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, n, h, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    normal = nn.initializers.normal(stddev=0.02)
    zeros = nn.initializers.zeros
    h_btd = LayerNorm(cfg.norm_eps, dt, pdt, name="ln_1")(x_btd)
    heads_in = ("embed", "heads", "head_dim")
    qkv = []
    for name, target in (("wq", "q"), ("wk", "k"), ("wv", "v")):
      w = weight(self, name, (d, n, h), heads_in, normal, cfg)
      y = projection(self, name, target, h_btd, w, 1, heads_in, cfg)
      if cfg.qkv_bias:
        y = y + param(self, "b" + name[1], (n, h), ("heads", "head_dim"), pdt, zeros).astype(dt)
      qkv.append(y)
    if cfg.flavor == "gpt_neo":  # its scores are not divided by sqrt(head_dim); attend's are
      qkv[0] = qkv[0] * jnp.asarray(np.sqrt(h), dt)
    out_btnh, kv = attend(*qkv, valid_bt, kv, dt, cfg.window, cfg.attention, native_decode(cfg))
    wo = weight(self, "wo", (n, h, d), ("heads", "head_dim", "embed"), normal, cfg)
    bo = param(self, "bo", (d,), ("norm",), pdt, zeros)
    x_btd = (
        x_btd
        + projection(
            self, "wo", "o", merge_heads(out_btnh), wo, 2, ("heads", "head_dim", "embed"), cfg
        )
        + bo.astype(dt)
    )
    h_btd = LayerNorm(cfg.norm_eps, dt, pdt, name="ln_2")(x_btd)
    w_in = weight(self, "w_in", (d, f), ("embed", "mlp"), normal, cfg)
    b_in = param(self, "b_in", (f,), ("mlp",), pdt, zeros)
    w_out = weight(self, "w_out", (f, d), ("mlp", "embed"), normal, cfg)
    b_out = param(self, "b_out", (d,), ("norm",), pdt, zeros)
    ff_btf = ACTIVATIONS[cfg.activation](
        constrain(
            projection(self, "w_in", "up", h_btd, w_in, 1, ("embed", "mlp"), cfg) + b_in.astype(dt),
            MLP_HIDDEN,
        )
    )
    mlp_btd = projection(
        self, "w_out", "down", ff_btf, w_out, 1, ("mlp", "embed"), cfg
    ) + b_out.astype(dt)
    return x_btd + mlp_btd, kv


class GPT2(nn.Module):
  """(tokens, positions, valid, cache) -> (logits_btv float32, hidden after ln_f, cache); with
  `with_logits=False` the logits are None (the loss applies `head_logits` in chunks); without a
  cache, `keep_kv` > 0 returns the first `keep_kv` tokens' keys and values as the cache."""

  cfg: GPT2Config

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
    normal = nn.initializers.normal(stddev=0.02)
    embedding_vd = param(
        self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt, normal
    )
    positions_pd = param(
        self, "positions", (cfg.max_positions, cfg.d_model), (None, "embed"), pdt, normal
    )
    rows_bt = jnp.clip(positions_bt + cfg.position_offset, 0, cfg.max_positions - 1)
    x_btd = jnp.take(embedding_vd, tokens_bt, axis=0) + jnp.take(positions_pd, rows_bt, axis=0)
    x_btd = constrain(x_btd.astype(dt), RESIDUAL)
    x_btd, new_cache = run_blocks(
        GPT2Block, cfg, x_btd, positions_bt, valid_bt, cache, keep_kv=keep_kv
    )
    hidden_btd = LayerNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x_btd)
    logits_btv = head_logits({"embedding": embedding_vd}, hidden_btd, cfg) if with_logits else None
    return logits_btv, hidden_btd, new_cache


def head_logits(params, hidden_btd, cfg: GPT2Config):
  """The tied LM head (the embedding's transpose) on hidden states, float32 logits."""
  dt = jnp.dtype(cfg.dtype)
  logits_btv = dense(hidden_btd, params["embedding"].astype(dt).T, cfg.platform)
  return constrain(logits_btv.astype(jnp.float32), LOGITS)


# ---- Hugging Face interchange ------------------------------------------------------------------
HF_MODEL_TYPES = ("gpt2", "gpt_neo", "opt")


def from_hf_config(hf: dict, model_type: str) -> GPT2Config:
  """Our config from an HF config dict (KeyError names a missing field, ValueError the rest)."""
  if model_type == "gpt2":
    if hf.get("activation_function", "gelu_new") != "gelu_new":
      raise ValueError(f"activation_function {hf['activation_function']!r}: only gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
      raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn unsupported")
    if hf.get("scale_attn_weights") is False:
      raise ValueError("scale_attn_weights=false is not supported")
    return GPT2Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
        max_positions=hf["n_positions"],
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )
  if model_type == "gpt_neo":
    if hf.get("activation_function", "gelu_new") != "gelu_new":
      raise ValueError(f"activation_function {hf['activation_function']!r}: only gelu_new")
    kinds = hf.get("attention_layers") or [
        kind for pattern, repeat in hf["attention_types"] for _ in range(repeat) for kind in pattern
    ]
    if len(kinds) != hf["num_layers"] or set(kinds) - {"global", "local"}:
      raise ValueError(f"attention_types give {kinds}, not one global/local per layer")
    return GPT2Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_layers"],
        n_heads=hf["num_heads"],
        d_ff=hf.get("intermediate_size") or 4 * hf["hidden_size"],
        max_positions=hf["max_position_embeddings"],
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        flavor="gpt_neo",
        local_window=hf.get("window_size", 256),
        local_layers=tuple(i for i, kind in enumerate(kinds) if kind == "local"),
    )
  if not hf.get("do_layer_norm_before", True):
    raise ValueError("do_layer_norm_before=false (OPT-350M's post-LayerNorm) is not supported")
  if hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]:
    raise ValueError("word_embed_proj_dim != hidden_size (OPT-350M) is not supported")
  if hf.get("activation_function", "relu") != "relu":
    raise ValueError(f"activation_function {hf['activation_function']!r}: only relu")
  if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
    raise ValueError("enable_bias / layer_norm_elementwise_affine false are not supported")
  if hf.get("_remove_final_layer_norm"):
    raise ValueError("_remove_final_layer_norm is not supported")
  return GPT2Config(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      d_ff=hf["ffn_dim"],
      max_positions=hf["max_position_embeddings"] + 2,
      flavor="opt",
  )


def to_hf_config(cfg: GPT2Config, model_type: str) -> dict:
  del model_type
  if cfg.flavor == "gpt2":
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "n_positions": cfg.max_positions,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": True,
    }
  if cfg.flavor == "gpt_neo":
    kinds = ["local" if i in cfg.local_layers else "global" for i in range(cfg.n_layers)]
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_layers": cfg.n_layers,
        "num_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_positions,
        "window_size": cfg.local_window,
        "attention_types": [[[kind], 1] for kind in kinds],
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": True,
    }
  return {
      "architectures": ["OPTForCausalLM"],
      "model_type": "opt",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "word_embed_proj_dim": cfg.d_model,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "ffn_dim": cfg.d_ff,
      "max_position_embeddings": cfg.max_positions - 2,
      "activation_function": "relu",
      "do_layer_norm_before": True,
      "enable_bias": True,
      "layer_norm_elementwise_affine": True,
      "tie_word_embeddings": True,
  }


def hf_tensors(cfg: GPT2Config) -> dict[str, HFTensor]:
  """HF name -> (our path(s), HF shape, HF->ours, ours->HF) for every tensor. GPT-2's fused
  `c_attn` (Conv1D, [in, out]) fills three of ours (`parts`)."""
  d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  same = lambda w: w
  transpose = lambda w: w.T
  heads_in = (lambda w: w.T.reshape(d, n, h), lambda w: w.reshape(d, n * h).T)  # Linear
  heads_out = (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)
  bias_heads = (lambda b: b.reshape(n, h), lambda b: b.reshape(n * h))
  if cfg.flavor == "gpt2":
    top, layers = "transformer.", "transformer.h.{}."
    names = dict(
        embed="wte",
        positions="wpe",
        final="ln_f",
        ln_1="ln_1",
        ln_2="ln_2",
        o="attn.c_proj",
        up="mlp.c_fc",
        down="mlp.c_proj",
    )
  elif cfg.flavor == "gpt_neo":
    top, layers = "transformer.", "transformer.h.{}."
    names = dict(
        embed="wte",
        positions="wpe",
        final="ln_f",
        ln_1="ln_1",
        ln_2="ln_2",
        o="attn.attention.out_proj",
        up="mlp.c_fc",
        down="mlp.c_proj",
    )
  else:
    top, layers = "model.decoder.", "model.decoder.layers.{}."
    names = dict(
        embed="embed_tokens",
        positions="embed_positions",
        final="final_layer_norm",
        ln_1="self_attn_layer_norm",
        ln_2="final_layer_norm",
        o="self_attn.out_proj",
        up="fc1",
        down="fc2",
    )
  p_rows = cfg.max_positions
  table = {
      f"{top}{names['embed']}.weight": HFTensor(("embedding",), (v, d), same, same),
      f"{top}{names['positions']}.weight": HFTensor(("positions",), (p_rows, d), same, same),
      f"{top}{names['final']}.weight": HFTensor(("final_norm", "scale"), (d,), same, same),
      f"{top}{names['final']}.bias": HFTensor(("final_norm", "bias"), (d,), same, same),
  }
  for i in range(cfg.n_layers):
    p, layer = layers.format(i), f"layer_{i}"
    entries = {
        f"{names['ln_1']}.weight": HFTensor((layer, "ln_1", "scale"), (d,), same, same),
        f"{names['ln_1']}.bias": HFTensor((layer, "ln_1", "bias"), (d,), same, same),
        f"{names['ln_2']}.weight": HFTensor((layer, "ln_2", "scale"), (d,), same, same),
        f"{names['ln_2']}.bias": HFTensor((layer, "ln_2", "bias"), (d,), same, same),
        f"{names['o']}.bias": HFTensor((layer, "bo"), (d,), same, same),
        f"{names['up']}.bias": HFTensor((layer, "b_in"), (f,), same, same),
        f"{names['down']}.bias": HFTensor((layer, "b_out"), (d,), same, same),
    }
    if cfg.flavor == "gpt2":  # Conv1D weights are stored [in, out]: ours without transposing
      entries.update(
          {
              "attn.c_attn.weight": HFTensor(
                  (layer, "wq"),
                  (d, 3 * d),
                  lambda w: tuple(part.reshape(d, n, h) for part in np.split(w, 3, axis=1)),
                  lambda ws: np.concatenate([w.reshape(d, n * h) for w in ws], axis=1),
                  ((layer, "wq"), (layer, "wk"), (layer, "wv")),
              ),
              "attn.c_attn.bias": HFTensor(
                  (layer, "bq"),
                  (3 * d,),
                  lambda b: tuple(part.reshape(n, h) for part in np.split(b, 3)),
                  lambda bs: np.concatenate([b.reshape(n * h) for b in bs]),
                  ((layer, "bq"), (layer, "bk"), (layer, "bv")),
              ),
              "attn.c_proj.weight": HFTensor(
                  (layer, "wo"), (d, d), lambda w: w.reshape(n, h, d), lambda w: w.reshape(d, d)
              ),
              "mlp.c_fc.weight": HFTensor((layer, "w_in"), (d, f), same, same),
              "mlp.c_proj.weight": HFTensor((layer, "w_out"), (f, d), same, same),
          }
      )
    else:  # nn.Linear weights, [out, in]
      attn = "attn.attention" if cfg.flavor == "gpt_neo" else "self_attn"
      for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        entries[f"{attn}.{theirs}.weight"] = HFTensor((layer, "w" + ours), (d, d), *heads_in)
        if cfg.qkv_bias:
          entries[f"{attn}.{theirs}.bias"] = HFTensor((layer, "b" + ours), (d,), *bias_heads)
      entries[f"{names['o']}.weight"] = HFTensor((layer, "wo"), (d, d), *heads_out)
      entries[f"{names['up']}.weight"] = HFTensor((layer, "w_in"), (f, d), transpose, transpose)
      entries[f"{names['down']}.weight"] = HFTensor((layer, "w_out"), (d, f), transpose, transpose)
    table.update({p + k: e for k, e in entries.items()})
  return table
