"""Open a pretrained student (an HF directory or a GGUF file): config, tokenizer, tensors.

`load_params` streams tensors one by one through `place`, so each lands on its devices (with its
sharding) before the next is read: a model larger than host memory never sits there whole.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator

import numpy as np
import tokenizers

from tailored_jax.data.tokenizer import Tokenizer
from tailored_jax.models import gguf_io, hf_io
from tailored_jax.models.hf_io import ModelImportError


@dataclasses.dataclass
class Pretrained:
  path: str
  cfg: object  # LlamaConfig | GPTJConfig
  model_type: str
  tokenizer: Tokenizer
  chat_template: str | None
  tensors: Callable[[], Iterator[tuple[str, str, np.ndarray]]]  # HF-named, re-readable

  def load_params(self, place=lambda path, array: array) -> dict:
    return hf_io.load_params(self.tensors(), self.cfg, place)


def _hf_tokenizer(directory: str) -> tuple[Tokenizer, str | None]:
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.exists(path):
    raise ModelImportError(f"{directory}: no tokenizer.json")
  tok = tokenizers.Tokenizer.from_file(path)
  settings = {}
  for name in ("tokenizer_config.json", "config.json"):
    p = os.path.join(directory, name)
    if os.path.exists(p):
      with open(p) as f:
        settings = {**json.load(f), **settings}

  def token_id(key):
    value = settings.get(f"{key}_token_id")
    if value is None:
      token = settings.get(f"{key}_token")
      token = token.get("content") if isinstance(token, dict) else token
      value = tok.token_to_id(token) if token else None
    return value[0] if isinstance(value, list) else value

  bos, eos, pad = token_id("bos"), token_id("eos"), token_id("pad")
  if eos is None:
    raise ModelImportError(f"{directory}: cannot tell the EOS token (no eos_token_id)")
  tokenizer = Tokenizer(tok, bos if bos is not None else eos, eos, pad if pad is not None else eos,
                        add_bos=bool(settings.get("add_bos_token", bos is not None)))
  return tokenizer, settings.get("chat_template")


def open_pretrained(path: str) -> Pretrained:
  if path.endswith(".gguf"):
    reader = gguf_io._reader(path)
    cfg = gguf_io.config_from_gguf(reader, path)
    backend, (bos, eos, pad), template = gguf_io.tokenizer_from_gguf(path)
    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
    tokenizer = Tokenizer(backend, bos if bos is not None else eos, eos, pad,
                          add_bos=bool(add_bos.contents()) if add_bos is not None else True)
    arch = reader.fields["general.architecture"].contents()
    return Pretrained(path, cfg, arch, tokenizer, template,
                      lambda: gguf_io.iter_gguf_tensors(reader, path, cfg))
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
      raise ModelImportError(f"{path}: no config.json")
    with open(config_path) as f:
      cfg, model_type = hf_io.config_from_hf(json.load(f), config_path)
    tokenizer, template = _hf_tokenizer(path)
    return Pretrained(path, cfg, model_type, tokenizer, template,
                      lambda: hf_io.iter_hf_tensors(path))
  raise ModelImportError(f"model not found: {path} (an HF directory or a .gguf file)")
