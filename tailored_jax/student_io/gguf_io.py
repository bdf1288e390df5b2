"""GGUF (llama.cpp) LLaMA-architecture files: config, dequantised tensors, embedded tokenizer.

Tensors are renamed to their HF names and handed to `hf_io.load_params`, so both formats share
one converter. llama.cpp stores q/k rows permuted for its rotary layout; they are un-permuted here.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from tailored_jax.student_io.hf_io import ModelImportError
from tailored_jax.models.llama import LlamaConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: str):
  import gguf

  if not os.path.exists(path):
    raise ModelImportError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError/struct.error/… on a bad file
    raise ModelImportError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader, key: str, path: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is not None:
      return default
    raise ModelImportError(f"{path}: GGUF metadata lacks {key!r}")
  return field.contents()


def config_from_gguf(reader, path: str) -> LlamaConfig:
  arch = _field(reader, "general.architecture", path)
  if arch not in ("llama", "mistral", "qwen2"):
    raise ModelImportError(f"{path}: GGUF architecture {arch!r} is not supported")
  names = {t.name for t in reader.tensors}
  n_heads = int(_field(reader, f"{arch}.attention.head_count", path))
  d_model = int(_field(reader, f"{arch}.embedding_length", path))
  return LlamaConfig(
      vocab_size=len(_field(reader, "tokenizer.ggml.tokens", path)),
      d_model=d_model,
      n_layers=int(_field(reader, f"{arch}.block_count", path)),
      n_heads=n_heads,
      n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", path, n_heads)),
      head_dim=int(_field(reader, f"{arch}.attention.key_length", path, d_model // n_heads)),
      d_ff=int(_field(reader, f"{arch}.feed_forward_length", path)),
      rope_theta=float(_field(reader, f"{arch}.rope.freq_base", path, 10000.0)),
      norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
      tie_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names,
  )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's convert-time permutation of q/k rows (interleaved -> half-split rotary)."""
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(reader, path: str, cfg: LlamaConfig) -> Iterator[tuple[str, str, np.ndarray]]:
  """(file, HF name, float32 array) per tensor, dequantised one at a time."""
  from gguf.quants import dequantize

  for tensor in reader.tensors:
    name = tensor.name
    if name in _TOP_NAMES:
      hf_name = _TOP_NAMES[name]
    elif name.startswith("blk."):
      _, layer, rest = name.split(".", 2)
      if rest not in _LAYER_NAMES:
        raise ModelImportError(f"{path}: unexpected tensor {name!r}")
      hf_name = f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    elif name == "rope_freqs.weight":
      continue
    else:
      raise ModelImportError(f"{path}: unexpected tensor {name!r}")
    try:
      array = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError as e:
      raise ModelImportError(
          f"{path}: tensor {name!r} uses quantisation "
          f"{tensor.tensor_type.name}, which cannot be dequantised"
      ) from e
    array = array.reshape([int(x) for x in reversed(tensor.shape)])
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
      array = _unpermute(array, cfg.n_heads)
    elif hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
      array = _unpermute(array, cfg.n_kv_heads)
    yield path, hf_name, array


def tokenizer_from_gguf(path: str):
  """The GGUF's embedded tokenizer as a `tokenizers.Tokenizer`, plus (bos, eos, pad) ids and the
  chat template (None if absent); built by transformers' GGUF converter."""
  import transformers

  hf = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
  )
  pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
  return hf.backend_tokenizer, (hf.bos_token_id, hf.eos_token_id, pad), hf.chat_template
