"""The exam's decode as the compiler sees it, without weights: the programs a run compiles
(continuous `insert`/`advance`, or static `generate`) and one decode step per decode layout with
its per-token bytes, FLOPs, collectives and a time-per-token estimate, so the planner can say
which layout (how many chips share one copy of the weights) decodes fastest on a slice."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from absl import logging

from tailored_jax import device_sheets, plan, sharding
from tailored_jax.models import decode_weights, for_decoding
from tailored_jax.models.layers import abstract_boxed_params
from tailored_jax.sample import continuous, decode
from tailored_jax.sample.runner import refill_shape
from tailored_jax.sample.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class ExamProgram:
  """The exam's decode for one layout: abstract per-layer weights placed for it, the mesh axes its
  rows split over and the sizes the exam runs at."""

  model: nn.Module
  mesh: jax.sharding.Mesh
  layout: str
  params: dict  # ShapeDtypeStructs with their decode shardings
  param_specs: dict  # logical PartitionSpecs
  row_axes: tuple[str, ...]
  head_axes: tuple[str, ...] | None
  prompts: int
  samples: int
  prompt_len: int
  new_tokens: int
  sampling: SamplingConfig

  @property
  def slots(self) -> int:
    return self.prompts * self.samples

  @property
  def row_shards(self) -> int:
    return math.prod(self.mesh.shape[axis] for axis in self.row_axes)

  def rows(self, shape, dtype) -> jax.ShapeDtypeStruct:
    placed = sharding.decode_batch_sharding(self.mesh, len(shape), self.row_axes)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=placed)

  def replicated(self, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(self.mesh))

  @property
  def row_sharding(self):
    return sharding.decode_batch_sharding(self.mesh, 2, self.row_axes)

  @property
  def tables(self):
    return jax.tree.map(jnp.asarray, decode.StopTables.never_stop(self.model.cfg.vocab_size))


def exam_program(cfg, train_model, mesh, layout: str) -> ExamProgram:
  """`cfg.exam`'s decode of `train_model` (attention already chosen for the mesh) in `layout`."""
  model = for_decoding(train_model)
  boxed = abstract_boxed_params(model)
  abstract = jax.eval_shape(lambda p: decode_weights(p, model.cfg), nn.meta.unbox(boxed))
  specs = nn.get_partition_spec(boxed)
  placed = sharding.decode_shardings(specs, abstract, mesh, layout)
  params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, placed
  )
  e = cfg.exam
  return ExamProgram(
      model=model,
      mesh=mesh,
      layout=layout,
      params=params,
      param_specs=specs,
      row_axes=sharding.decode_row_axes(layout, placed),
      head_axes=sharding.decode_head_axes(layout, mesh, model.cfg),
      prompts=e.batch_size,
      samples=e.num_samples,
      prompt_len=max(cfg.train.max_seq_len - e.max_new_tokens, 8),
      new_tokens=e.max_new_tokens,
      sampling=SamplingConfig(e.temperature, e.top_k, e.top_p),
  )


def abstract_slots(p: ExamProgram) -> continuous.Slots:
  """The decode slots (`continuous.empty_slots`) as abstract arrays placed as the runner does."""
  make, placed = decode.slot_layout(
      p.model,
      None,
      slots=p.slots,
      prompt_slots=p.prompt_len,
      max_new_tokens=p.new_tokens,
      pad_id=0,
      mesh=p.mesh,
      row_axes=p.row_axes,
      head_axes=p.head_axes,
  )
  return jax.tree.map(
      lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
      jax.eval_shape(make, None),
      placed,
  )


def compile_static(p: ExamProgram):
  """`decode.generate` over one batch of prompts, k samples each."""
  generate = jax.jit(
      functools.partial(
          decode.generate,
          model=p.model,
          max_new_tokens=p.new_tokens,
          num_samples=p.samples,
          sampling=p.sampling,
          rows=p.row_sharding,
      )
  )
  return generate.lower(
      p.params,
      p.rows((p.prompts, p.prompt_len), jnp.int32),
      p.rows((p.prompts, p.prompt_len), bool),
      p.rows((p.prompts, p.samples, 2), jnp.uint32),
      p.tables,
  ).compile()


def compile_continuous(p: ExamProgram) -> tuple:
  """(advance, insert) as the runner calls them: the slots donated, one refill's shape
  (`runner.refill_shape`)."""
  refill, unique = refill_shape(p.slots, p.samples, p.row_shards)
  state = abstract_slots(p)
  advance = jax.jit(
      functools.partial(
          continuous.advance, model=p.model, sampling=p.sampling, rows=p.row_sharding
      ),
      donate_argnums=1,
  ).lower(p.params, state, p.replicated((), jnp.int32), p.tables)
  insert = jax.jit(functools.partial(continuous.insert, model=p.model), donate_argnums=1).lower(
      p.params,
      state,
      p.rows((unique, p.prompt_len), jnp.int32),
      p.rows((unique, p.prompt_len), bool),
      p.replicated((refill,), jnp.int32),
      p.replicated((refill,), jnp.int32),
      p.replicated((refill, 2), jnp.uint32),
      p.tables,
  )
  return advance.compile(), insert.compile()


def compile_step(p: ExamProgram):
  """One decode step of every slot (`continuous.step`), the unit a token costs."""
  step = jax.jit(
      functools.partial(continuous.step, model=p.model, sampling=p.sampling, rows=p.row_sharding),
      donate_argnums=1,
  )
  return step.lower(p.params, abstract_slots(p), p.tables).compile()


def choose_decode_layout(cfg, train_model, mesh, budget: int) -> str:
  """`mesh.decode_layout=auto`: one exam decode step compiled for the run's own devices in each
  layout, and the one `plan.fastest_layout` picks by the compiler's numbers (time per token from
  the chip's data sheet where there is one), logged with each layout's figures."""
  if mesh.devices.size == 1:
    logging.info("mesh.decode_layout=auto: one device, every layout the same: replicated")
    return "replicated"
  kind = mesh.devices.flat[0].device_kind
  compared = plan.compare_decode_layouts(
      cfg, train_model, mesh, device_sheets.peaks_of(kind), budget
  )
  for name, entry in compared["layouts"].items():
    logging.info(
        "decode layout %s: fits %s, %.1f MiB per device, %d bytes moved per token%s",
        name,
        entry["fits"],
        entry.get("xla_bytes_per_device", {}).get("total", 0) / 2**20,
        entry.get("collective_bytes_per_token", 0),
        f", about {entry['estimated_tokens_per_second']:.0f} tokens/s (estimate)"
        if "estimated_tokens_per_second" in entry
        else "",
    )
  best = compared["best_layout"]
  if best is None:
    raise ValueError(
        f"config field mesh.decode_layout=auto: no decode layout's exam step fits"
        f" {budget / 2**30:.1f} GiB per device ({kind}); lower exam.batch_size"
    )
  logging.info("mesh.decode_layout=auto: %s on %s (%s)", best, kind, compared["layouts_note"])
  return best
