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


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ModelImportError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def _hf_tokenizer(directory: str) -> tuple[Tokenizer, str | None]:
  """tokenizer.json with its special ids: token strings in tokenizer_config.json first, then the
  ids in generation_config.json / config.json."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.exists(path):
    raise ModelImportError(f"{directory}: no tokenizer.json")
  tok = tokenizers.Tokenizer.from_file(path)
  settings = _read_json(os.path.join(directory, "tokenizer_config.json"))
  id_sources = [(name, _read_json(os.path.join(directory, name)))
                for name in ("generation_config.json", "config.json")]

  def token_id(key):
    token = settings.get(f"{key}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if token:
      if tok.token_to_id(token) is None:
        raise ModelImportError(f"{directory}/tokenizer_config.json: {key}_token {token!r} is "
                               "not in tokenizer.json")
      return tok.token_to_id(token)
    for name, source in id_sources:
      value = source.get(f"{key}_token_id")
      value = value[0] if isinstance(value, list) and value else value
      if value is not None:
        if not 0 <= value < tok.get_vocab_size():
          raise ModelImportError(f"{directory}/{name}: {key}_token_id {value} is outside the "
                                 f"tokenizer's {tok.get_vocab_size()} tokens")
        return value
    return None

  bos, eos, pad = token_id("bos"), token_id("eos"), token_id("pad")
  if eos is None:
    raise ModelImportError(f"{directory}: cannot tell the EOS token (no eos_token or "
                           "eos_token_id)")
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
