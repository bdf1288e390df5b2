"""Hugging Face checkpoints (llama, mistral, qwen2, gptj, gpt2, opt) <-> our Flax params.

Import reads config.json and (sharded) safetensors tensor by tensor, so a model larger than host
memory streams onto the mesh one parameter at a time; export writes config.json and
model.safetensors that `transformers` loads.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import jax
import numpy as np

from tailored_jax.models import gpt2, gptj, llama
from tailored_jax.models.gpt2 import GPT2Config
from tailored_jax.models.gptj import GPTJConfig
from tailored_jax.models.layers import HFTensor, is_stacked, tree_get, tree_set, unstack_layers
from tailored_jax.models.llama import LlamaConfig


class ModelImportError(ValueError):
  pass


# One entry per family module: its config class and its HF interchange functions
# (`HF_MODEL_TYPES`, `from_hf_config`, `to_hf_config`, `hf_tensors`).
FAMILIES = {LlamaConfig: llama, GPTJConfig: gptj, GPT2Config: gpt2}
_BY_MODEL_TYPE = {t: module for module in FAMILIES.values() for t in module.HF_MODEL_TYPES}
SUPPORTED = tuple(_BY_MODEL_TYPE)


def family(cfg):
  """The family module of one of our configs."""
  return FAMILIES[type(cfg)]


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[LlamaConfig | GPTJConfig, str]:
  """Our config and the HF model_type, from an HF config dict."""
  model_type = hf.get("model_type")
  if model_type not in _BY_MODEL_TYPE:
    raise ModelImportError(
        f"{source}: model_type {model_type!r} is not supported; "
        f"supported: {', '.join(SUPPORTED)}"
    )
  try:
    return _BY_MODEL_TYPE[model_type].from_hf_config(hf, model_type), model_type
  except KeyError as e:
    raise ModelImportError(f"{source}: missing field {e}") from e
  except ValueError as e:
    raise ModelImportError(f"{source}: {e}") from e


def hf_config(cfg, model_type: str, bos_id: int | None, eos_id: int | None) -> dict:
  return dict(
      family(cfg).to_hf_config(cfg, model_type),
      torch_dtype="float32",
      bos_token_id=bos_id,
      eos_token_id=eos_id,
  )


def tensor_table(cfg) -> dict[str, HFTensor]:
  return family(cfg).hf_tensors(cfg)


def to_hf(params, cfg) -> dict[str, np.ndarray]:
  """Our params (a nested dict of arrays; a scanned model's stacked layers too) as HF tensors
  (float32 numpy)."""
  if is_stacked(params):
    params = unstack_layers({k: jax.tree.map(np.asarray, v) for k, v in params.items()})
  get = lambda path: np.asarray(tree_get(params, path), np.float32)
  return {
      name: np.ascontiguousarray(
          entry.to_hf(tuple(map(get, entry.parts)) if entry.parts else get(entry.path))
      )
      for name, entry in tensor_table(cfg).items()
  }


def safetensors_files(directory: str) -> list[str]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(directory, name) for name in files]
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise ModelImportError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def iter_hf_tensors(directory: str) -> Iterator[tuple[str, str, np.ndarray]]:
  """(file, name, float32 array) for every tensor, read one at a time."""
  from safetensors import safe_open

  for path in safetensors_files(directory):
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        yield path, name, np.asarray(f.get_tensor(name), np.float32)


def load_params(
    tensors: Iterator[tuple[str, str, np.ndarray]],
    cfg,
    place: Callable[[tuple[str, ...], np.ndarray], object] = lambda path, a: a,
) -> dict:
  """Our param tree from HF-named tensors; `place` puts each onto devices as it is converted.

  Unknown tensors, shape mismatches and missing tensors each raise naming the file and tensor.
  """
  expected = tensor_table(cfg)
  params: dict = {}
  seen = set()
  for source, name, array in tensors:
    if (
        name.endswith("rotary_emb.inv_freq")
        or name.endswith((".attn.bias", ".attention.bias"))  # causal-mask buffers, not c_attn.bias
        or name.endswith("attn.masked_bias")
        or (getattr(cfg, "tie_embeddings", False) and name == "lm_head.weight")
    ):
      continue
    if name not in expected:
      raise ModelImportError(f"{source}: unexpected tensor {name!r} for this architecture")
    entry = expected[name]
    if tuple(array.shape) != entry.hf_shape:
      raise ModelImportError(
          f"{source}: tensor {name!r} has shape {tuple(array.shape)}, config "
          f"says {entry.hf_shape}"
      )
    if entry.parts:
      for path, part in zip(entry.parts, entry.to_ours(array)):
        tree_set(params, path, place(path, np.ascontiguousarray(part)))
    else:
      tree_set(params, entry.path, place(entry.path, np.ascontiguousarray(entry.to_ours(array))))
    seen.add(name)
  missing = sorted(set(expected) - seen)
  if missing:
    raise ModelImportError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  return params


def save_hf_dir(
    directory: str,
    params,
    cfg,
    model_type: str = "llama",
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> None:
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  save_file(
      to_hf(params, cfg), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"}
  )
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config(cfg, model_type, bos_id, eos_id), f, indent=2)
