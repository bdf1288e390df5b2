"""The student on devices, built in one place: tokenizer, model, trainer, decoder and weights.

Phases ask it for the weights after round r (0: the initial student, pad-token rows included);
nothing here depends on which phase ran before.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tailored_jax import checkpointing, exam_plan, sharding
from tailored_jax.data.tokenizer import Tokenizer
from tailored_jax.layout import Layout
from tailored_jax.models import (
    build_model,
    casts_for_decoding,
    decode_weights,
    for_devices,
    layers,
    lora,
    model_for,
    quantize,
)
from tailored_jax.models.attention import cpu_native
from tailored_jax.student_io import vocab
from tailored_jax.models.layers import tree_get
from tailored_jax.student_io.pretrained import Pretrained
from tailored_jax.sample.decode import Decoder, StopTables
from tailored_jax.sample.memory import device_memory_bytes
from tailored_jax.train.trainer import Trainer


def one_attention_for_all_processes(model_section, mesh) -> None:
  """Every process runs the native CPU attention, or none does: a process whose compiler
  cannot build it (or, for 'auto', that lacks AVX-512) would otherwise trace another program
  than the rest and hang them."""
  if jax.process_count() == 1 or model_section.attention not in ("auto", "cpu_native"):
    return
  if mesh.devices.flat[0].platform != "cpu":
    return
  if sharding.smallest(int(cpu_native.available())) == 0 and cpu_native.available():
    cpu_native.turn_off("another process of this run cannot build it")
  if model_section.attention == "auto":
    if sharding.smallest(int(cpu_native.fast_here())) == 0 and cpu_native.fast_here():
      cpu_native.not_for_auto("another process of this run lacks AVX-512")


class StudentRuntime:

  def __init__(
      self, cfg: ml_collections.ConfigDict, layout: Layout, mesh, pretrained: Pretrained | None
  ):
    self.cfg = cfg
    self.layout = layout
    self.mesh = mesh
    self.pretrained = pretrained
    self.tokenizer = Tokenizer.load(layout.tokenizer)
    one_attention_for_all_processes(cfg.model, mesh)
    self.model = for_devices(
        build_model(cfg.model, self.tokenizer.vocab_size, pretrained.cfg if pretrained else None),
        mesh.devices.flat,
    )
    self.trainer = Trainer(self.model, cfg.train, mesh, cfg.method.reflection_loss)
    self.trainer.fit_memory(
        cfg.train.memory_budget_gb, lambda: sharding.smallest(device_memory_bytes())
    )
    self.decoder = Decoder(
        self.model, StopTables.from_tokenizer(self.tokenizer, self.model.cfg.vocab_size)
    )
    self._held = None  # (round, params): the last weights asked for or trained
    self.decode_layout = cfg.mesh.decode_layout
    if self.decode_layout == "auto":
      budget = int(cfg.exam.memory_budget_gb * 2**30) or device_memory_bytes()
      self.decode_layout = exam_plan.choose_decode_layout(
          cfg, self.model, mesh, sharding.smallest(budget)
      )
    per_layer = layers.abstract_boxed_params(self.decoder.model)  # what decoding reads
    per_layer_specs = nn.get_partition_spec(per_layer)
    self._per_layer_shardings = sharding.logical_sharding(per_layer, mesh)
    decode_cfg = self.decoder.model.cfg
    self._to_decode_layout = jax.jit(
        lambda params: decode_weights(
            layers.unstack_layers(lora.folded(params, self.model.cfg)), decode_cfg
        ),
        out_shardings=sharding.decode_shardings(
            per_layer_specs, nn.meta.unbox(per_layer), mesh, self.decode_layout
        ),
    )
    self._decode_held = None  # (round, params in the decode layout)

  def params(self, round_index: int):
    """The weights after `round_index` (0: the initial student)."""
    if self._held is not None and self._held[0] == round_index:
      return self._held[1]
    if round_index > 0:
      params = checkpointing.restore_params(
          self.layout.params_dir(round_index),
          self.trainer.abstract_params,
          self.trainer.param_shardings,
      )
    elif self.pretrained is not None:
      params = self.trainer.with_fresh_adapters(self._pretrained_params(), self.cfg.seed)
    else:
      params = self.trainer.init_params(self.cfg.seed)
    self.hold(round_index, params)
    return params

  def decode_params(self, round_index: int):
    """The weights after `round_index` in the decode layout (`mesh.decode_layout`) and the
    compute dtype (`decode_weights`), moved once per round so that decoding never gathers a
    weight per token."""
    if self._decode_held is None or self._decode_held[0] != round_index:
      params = self.params(round_index)
      if (
          self.decode_layout != "train"
          or layers.is_stacked(params)
          or lora.has_adapters(params)
          or casts_for_decoding(self.model.cfg)
      ):
        params = self._to_decode_layout(params)
      self._decode_held = (round_index, params)
    return self._decode_held[1]

  def hold(self, round_index: int, params) -> None:
    self._held = (round_index, params)
    if self._decode_held is not None and self._decode_held[0] == round_index:
      self._decode_held = None

  def _pretrained_params(self):
    """The pretrained weights streamed onto their shardings (a scanned model's layers stacked
    one parameter at a time); an added pad token's embedding and LM-head rows are the mean of
    the trained rows (METHOD §4)."""
    dtype = jnp.dtype(self.cfg.model.param_dtype)
    kind = self.model.cfg.base_quantization
    targets = self._per_layer_shardings
    if kind != "none":  # the projections quantised on the host as they stream in
      stored = dataclasses.replace(self.model.cfg, scan_layers=False, remat="none", lora_rank=0)
      targets = sharding.logical_sharding(
          layers.abstract_boxed_params(model_for(stored)), self.mesh
      )
    source = self.pretrained.tokenizer
    pad_added = self.tokenizer.pad_id != source.pad_id
    # rows that hold trained tokens (transformers may know tokens the model has no row for)
    trained_rows = min(source.vocab_size, self.pretrained.cfg.vocab_size)

    def place(path, array):
      if pad_added and path in vocab.VOCAB_AXIS:
        array = vocab.with_mean_row(
            array, vocab.VOCAB_AXIS[path], self.tokenizer.pad_id, trained_rows
        )
      target = tree_get(targets, path)
      if quantize.is_quantized(target):
        codes = quantize.quantize(array.astype(np.float32), quantize.INPUT_AXES[path[-1]], kind)
        return {k: sharding.put_global(v, target[k]) for k, v in codes.items()}
      return sharding.put_global(array.astype(dtype), target)

    params = self.pretrained.load_params(place)
    if not self.model.cfg.scan_layers:
      return params
    stacked_shardings = self.trainer.param_shardings[layers.LAYERS]

    def stack(path, parts):
      target = tree_get(stacked_shardings, path)
      return jax.jit(lambda *parts: jnp.stack(parts), out_shardings=target)(*parts)

    return layers.stack_layers(params, self.model.cfg.n_layers, stack)
