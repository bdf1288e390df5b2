"""Student model families, built from the `model` section of the config."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tailored_jax.models import gpt2, gptj, llama
from tailored_jax.models.attention import dispatch
from tailored_jax.models.gpt2 import GPT2, GPT2Config
from tailored_jax.models.gptj import GPTJ, GPTJConfig
from tailored_jax.models.layers import execution_of
from tailored_jax.models.llama import Llama, LlamaConfig


def llama_config(cfg, vocab_size: int) -> LlamaConfig:
  return LlamaConfig(
      vocab_size=vocab_size,
      d_model=cfg.d_model,
      n_layers=cfg.n_layers,
      n_heads=cfg.n_heads,
      n_kv_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim,
      d_ff=cfg.d_ff,
      rope_theta=cfg.rope_theta,
      norm_eps=cfg.norm_eps,
      tie_embeddings=cfg.tie_embeddings,
      **execution_of(cfg),
  )


MODULES = {LlamaConfig: Llama, GPTJConfig: GPTJ, GPT2Config: GPT2}
HEADS = {
    LlamaConfig: llama.head_logits,
    GPTJConfig: gptj.head_logits,
    GPT2Config: gpt2.head_logits,
}


def model_for(cfg: LlamaConfig | GPTJConfig):
  """The Flax module of an architecture config."""
  return MODULES[type(cfg)](cfg)


def for_devices(model, devices):
  """The same model with its training attention (and weight matmul) chosen for `devices`, the
  devices its steps compile for (`attention.dispatch.resolve`); a chosen one is kept."""
  return model_for(dispatch.resolve(model.cfg, list(devices)))


def for_decoding(model):
  """The same architecture with per-layer parameters and no remat: decoding updates one cache
  buffer per layer in place, which a scan over stacked layers would copy every token (convert
  the weights with `layers.unstack_layers`); LoRA adapters folded into their weights
  (`lora.merged`)."""
  return model_for(
      dataclasses.replace(
          model.cfg, scan_layers=False, remat="none", lora_rank=0, base_quantization="none"
      )
  )


# Matrices a family uses in the parameter dtype (GPT-2 sums its token and position embeddings
# before casting), which decoding therefore keeps there.
_USED_IN_PARAM_DTYPE = {GPT2Config: ("embedding", "positions")}


def casts_for_decoding(cfg) -> bool:
  """Whether `decode_weights` changes anything: the compute dtype is not the parameters'."""
  return jnp.dtype(cfg.dtype) != jnp.dtype(cfg.param_dtype)


def decode_weights(params, cfg):
  """The per-layer weights decoding reads, with every matrix the model casts to the compute
  dtype before its matmul cast once (a bf16 model's exam reads half the bytes per token from
  float32 master weights) and the same results; vectors (norm scales, biases, used in float32
  or cast per use) and `_USED_IN_PARAM_DTYPE` as they are. Works on ShapeDtypeStructs under
  `jax.eval_shape`."""
  if not casts_for_decoding(cfg):
    return params
  dt = jnp.dtype(cfg.dtype)
  keep = _USED_IN_PARAM_DTYPE.get(type(cfg), ())

  def cast(path, x):
    if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) and path[-1].key not in keep:
      return x.astype(dt)
    return x

  return jax.tree_util.tree_map_with_path(cast, params)


def head_logits(params, hidden_btd, cfg: LlamaConfig | GPTJConfig):
  """The family's LM head applied outside the module (chunked losses)."""
  return HEADS[type(cfg)](params, hidden_btd, cfg)


def build_model(cfg, vocab_size: int, pretrained: LlamaConfig | GPTJConfig | None = None):
  """The student: a pretrained model's architecture (with our dtype/remat settings, and room for
  a pad token added to its tokenizer), or one built from `cfg` (family 'llama': LLaMA 2/3,
  Mistral, Qwen2, SmolLM2 shapes)."""
  if pretrained is not None:
    return model_for(
        dataclasses.replace(
            pretrained, vocab_size=max(pretrained.vocab_size, vocab_size), **execution_of(cfg)
        )
    )
  if cfg.family != "llama":
    raise ValueError(f"config field model.family: unknown family {cfg.family!r}; known: ['llama']")
  return Llama(llama_config(cfg, vocab_size))
