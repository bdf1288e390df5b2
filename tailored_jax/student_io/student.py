"""Load a student from any source the tools accept: an HF directory, a GGUF file, or a
tailored_jax round checkpoint (`WORKDIR/checkpoints/round_R`)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp

from tailored_jax import checkpointing, config_lib, storage
from tailored_jax.data.tokenizer import Tokenizer
from tailored_jax.layout import Layout
from tailored_jax.models import build_model, for_decoding, lora, model_for
from tailored_jax.student_io.hf_io import ModelImportError
from tailored_jax.models.layers import abstract_params, unstack_layers
from tailored_jax.models.gptj import GPTJ
from tailored_jax.models.llama import Llama
from tailored_jax.student_io.pretrained import open_pretrained


@dataclasses.dataclass
class Student:
  model: Llama | GPTJ
  params: dict
  tokenizer: Tokenizer
  model_type: str
  chat_template: str | None = None
  base_model: str = ""  # the pretrained weights a workdir's student started from (init_from)
  adapted: tuple | None = None  # LoRA: (model config, per-layer params with the adapters unmerged)


def _layout_of(checkpoint: str) -> Layout | None:
  layout = Layout.of_params_dir(checkpoint)
  if storage.exists(layout.config) and storage.exists(layout.tokenizer):
    return layout
  return None


def load_student(src: str) -> Student:
  layout = _layout_of(src) if storage.is_dir(src) else None
  if layout is None or storage.exists(storage.join(src, "config.json")):
    pretrained = open_pretrained(src)
    model = model_for(pretrained.cfg)
    params = jax.tree.map(jnp.asarray, pretrained.load_params())
    return Student(
        model, params, pretrained.tokenizer, pretrained.model_type, pretrained.chat_template
    )
  cfg = config_lib.from_saved(json.loads(storage.read_text(layout.config)))
  tokenizer = Tokenizer.load(layout.tokenizer)
  pretrained = open_pretrained(cfg.model.init_from) if cfg.model.init_from else None
  model = build_model(cfg.model, tokenizer.vocab_size, pretrained.cfg if pretrained else None)
  abstract = abstract_params(model)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  try:
    params = checkpointing.restore_params(src, abstract, jax.tree.map(lambda _: device, abstract))
  except checkpointing.CheckpointError as e:
    raise ModelImportError(str(e)) from e
  adapted = (model.cfg, unstack_layers(params)) if lora.has_adapters(params) else None
  model, params = for_decoding(model), unstack_layers(lora.folded(params, model.cfg))
  return Student(
      model,
      params,
      tokenizer,
      pretrained.model_type if pretrained else "llama",
      pretrained.chat_template if pretrained else None,
      cfg.model.init_from,
      adapted,
  )
