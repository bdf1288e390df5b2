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

from tailored_jax.data.tokenizer import Tokenizer, special_affixes, with_special_affixes
from tailored_jax.student_io import gguf_io, hf_io
from tailored_jax.student_io.hf_io import ModelImportError


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


# Texts on which the tokenizer we use must give transformers' ids, special tokens included.
_PROBES = (
    "Question: Mia has 4 plums.\nReasoning: 4 + 5 = 9.\nAnswer: 9",
    " leading space",
    "Ünïcödé, 12,345.6!",
)


def _as_transformers_encodes(directory: str, raw: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """The tokenizer exactly as `transformers.AutoTokenizer` applies it to this directory: its
  backend (transformers may swap pre-tokenizers or post-processors by tokenizer class), with the
  special tokens transformers inserts; checked on probe texts."""
  import transformers

  try:
    hf = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  except Exception as e:  # any failure of transformers' loader: report, keep the cause
    raise ModelImportError(
        f"{directory}: transformers cannot load this tokenizer ({type(e).__name__}: {e})"
    ) from e
  backend = getattr(hf, "backend_tokenizer", None) or raw
  backend = tokenizers.Tokenizer.from_str(backend.to_str())
  with_specials = hf(_PROBES[0])["input_ids"]
  content = hf(_PROBES[0], add_special_tokens=False)["input_ids"]
  if backend.encode(_PROBES[0]).ids != with_specials:
    at = next(
        (
            i
            for i in range(len(with_specials) - len(content) + 1)
            if with_specials[i : i + len(content)] == content
        ),
        None,
    )
    if at is not None:
      backend = with_special_affixes(
          backend, with_specials[:at], with_specials[at + len(content) :]
      )
  for probe in _PROBES:
    expected, got = hf(probe)["input_ids"], backend.encode(probe).ids
    if got != expected:
      raise ModelImportError(
          f"{directory}: cannot reproduce transformers' tokenization of "
          f"{probe!r}: {got} != {expected}"
      )
  return backend


def _hf_tokenizer(directory: str) -> tuple[Tokenizer, str | None]:
  """The directory's tokenizer as transformers applies it, with its special ids: token strings
  in tokenizer_config.json first, then the ids in generation_config.json / config.json."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.exists(path):
    raise ModelImportError(f"{directory}: no tokenizer.json")
  tok = tokenizers.Tokenizer.from_file(path)
  settings = _read_json(os.path.join(directory, "tokenizer_config.json"))
  id_sources = [
      (name, _read_json(os.path.join(directory, name)))
      for name in ("generation_config.json", "config.json")
  ]

  def token_id(key):
    token = settings.get(f"{key}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if token:
      if tok.token_to_id(token) is None:
        raise ModelImportError(
            f"{directory}/tokenizer_config.json: {key}_token {token!r} is not in tokenizer.json"
        )
      return tok.token_to_id(token)
    for name, source in id_sources:
      value = source.get(f"{key}_token_id")
      value = value[0] if isinstance(value, list) and value else value
      if value is not None:
        if not 0 <= value < tok.get_vocab_size():
          raise ModelImportError(
              f"{directory}/{name}: {key}_token_id {value} is outside the "
              f"tokenizer's {tok.get_vocab_size()} tokens"
          )
        return value
    return None

  bos, eos, pad = token_id("bos"), token_id("eos"), token_id("pad")
  if eos is None:
    raise ModelImportError(f"{directory}: cannot tell the EOS token (no eos_token or eos_token_id)")
  tokenizer = Tokenizer(
      _as_transformers_encodes(directory, tok),
      bos if bos is not None else eos,
      eos,
      pad if pad is not None else eos,
  )
  return tokenizer, settings.get("chat_template")


def _gguf_special_tokens(
    reader, backend: tokenizers.Tokenizer, bos: int | None, eos: int
) -> tokenizers.Tokenizer:
  """llama.cpp's rule: BOS/EOS around every sequence as `tokenizer.ggml.add_{bos,eos}_token`
  say; where the file does not say, what transformers' GGUF converter built."""
  prefix, suffix = special_affixes(backend)
  flags = {key: reader.fields.get(f"tokenizer.ggml.add_{key}_token") for key in ("bos", "eos")}
  if flags["bos"] is not None:
    prefix = [bos] if bool(flags["bos"].contents()) and bos is not None else []
  if flags["eos"] is not None:
    suffix = [eos] if bool(flags["eos"].contents()) else []
  if (prefix, suffix) == special_affixes(backend):
    return backend
  return with_special_affixes(backend, prefix, suffix)


def open_pretrained(path: str) -> Pretrained:
  if path.endswith(".gguf"):
    reader = gguf_io._reader(path)
    cfg = gguf_io.config_from_gguf(reader, path)
    backend, (bos, eos, pad), template = gguf_io.tokenizer_from_gguf(path)
    tokenizer = Tokenizer(
        _gguf_special_tokens(reader, backend, bos, eos), bos if bos is not None else eos, eos, pad
    )
    arch = reader.fields["general.architecture"].contents()
    return Pretrained(
        path, cfg, arch, tokenizer, template, lambda: gguf_io.iter_gguf_tensors(reader, path, cfg)
    )
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
      raise ModelImportError(f"{path}: no config.json")
    with open(config_path) as f:
      cfg, model_type = hf_io.config_from_hf(json.load(f), config_path)
    tokenizer, template = _hf_tokenizer(path)
    return Pretrained(
        path, cfg, model_type, tokenizer, template, lambda: hf_io.iter_hf_tensors(path)
    )
  raise ModelImportError(f"model not found: {path} (an HF directory or a .gguf file)")
