"""`python -m tailored_jax.plan --config=configs/NAME.py --model=PRESET --topology=v5e:4x4`:
lowers and compiles the real train step (LM + self-reflection, the config's remat and dtypes)
and the exam's decode step on abstract arguments (shapes, dtypes and shardings; no weights
allocated) with the TPU compiler for the slice's compile-only devices (libtpu; no TPU needed),
and prints JSON: per-device bytes from the compiler's memory analysis against the chip's HBM,
the collectives and custom calls (the attention kernel) in each program, and a roofline step
time from the compiler's cost analysis and the chip's data-sheet peaks (an estimate). Exits 1,
after the JSON, when the train step does not fit.

Without --topology (GPU presets, `--mesh`/`--slice`), the steps compile with XLA:CPU over as
many forced host devices: a stand-in for a GPU compiler (the CPU attention form, CPU fusion), as
the JSON's "compiler" says. Presets carry the paper's students' public config.json values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

from tailored_jax import tpu_slices

PRESETS = {
    # EleutherAI/gpt-j-6b config.json
    "gptj_6b": (
        "gptj",
        dict(
            vocab_size=50400,
            d_model=4096,
            n_layers=28,
            n_heads=16,
            d_ff=16384,
            rotary_dim=64,
            norm_eps=1e-5,
        ),
    ),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3_8b": (
        "llama",
        dict(
            vocab_size=128256,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            d_ff=14336,
            rope_theta=500000.0,
            norm_eps=1e-5,
            tie_embeddings=False,
        ),
    ),
    # openai-community/gpt2-large config.json (the size study's GPT-2-Large)
    "gpt2_large": (
        "gpt2",
        dict(
            vocab_size=50257,
            d_model=1280,
            n_layers=36,
            n_heads=20,
            d_ff=5120,
            max_positions=1024,
            norm_eps=1e-5,
        ),
    ),
    # EleutherAI/gpt-neo-2.7B config.json: every other layer local (window 256); its layers
    # run one by one (model.scan_layers=False), as their windows differ
    "gpt_neo_2_7b": (
        "gpt2",
        dict(
            vocab_size=50257,
            d_model=2560,
            n_layers=32,
            n_heads=20,
            d_ff=10240,
            max_positions=2048,
            norm_eps=1e-5,
            flavor="gpt_neo",
            local_window=256,
            local_layers=tuple(range(1, 32, 2)),
        ),
    ),
    # facebook/opt-iml-1.3b config.json (OPT's architecture)
    "opt_iml_1_3b": (
        "gpt2",
        dict(
            vocab_size=50272,
            d_model=2048,
            n_layers=24,
            n_heads=32,
            d_ff=8192,
            max_positions=2048 + 2,
            flavor="opt",
        ),
    ),
    # HuggingFaceTB/SmolLM2-135M config.json
    "smollm2_135m": (
        "llama",
        dict(
            vocab_size=49152,
            d_model=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            head_dim=64,
            d_ff=1536,
            rope_theta=100000.0,
            norm_eps=1e-5,
            tie_embeddings=True,
        ),
    ),
    # meta-llama/Llama-3.2-1B config.json (the GPU check's ~1B LLaMA)
    "llama32_1b": (
        "llama",
        dict(
            vocab_size=128256,
            d_model=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            head_dim=64,
            d_ff=8192,
            rope_theta=500000.0,
            norm_eps=1e-5,
            tie_embeddings=True,
            rope_scaling="llama3",
            rope_factor=32.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_positions=8192,
        ),
    ),
    # for tests: a shape whose step the planner is checked on against XLA
    "planner_check": (
        "llama",
        dict(
            vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768
        ),
    ),
    # for tests
    "tiny": (
        "llama",
        dict(vocab_size=512, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, d_ff=128),
    ),
}

_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\("
)
_BYTES = {
    "f32": 4,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f64": 8,
    "s64": 8,
}

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_WHILE = re.compile(r"while\(.*body=%([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """The module's computations (name -> instruction lines) and the entry computation's name."""
  blocks: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      blocks[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif current is not None:
      blocks[current].append(line)
  return blocks, entry


def _executions(blocks: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry: a while body its known trip
  count times its caller's (1 when XLA does not know it), called computations as their caller."""
  runs = {entry: 1}
  pending = [entry]
  while pending:
    name = pending.pop()
    for line in blocks.get(name, ()):
      loop = _WHILE.search(line)
      if loop:
        trips = _TRIPS.search(line)
        callees = [(loop.group(1), int(trips.group(1)) if trips else 1)]
      else:
        callees = [(callee, 1) for callee in _CALLS.findall(line)]
      for callee, times in callees:
        if callee in blocks:
          runs[callee] = runs.get(callee, 0) + runs[name] * times
          pending.append(callee)
  return runs


def collective_op(line: str) -> tuple[str, list[tuple[str, tuple[int, ...]]]] | None:
  """(kind, [(dtype, dims) of each result]) when an HLO instruction line is a collective."""
  match = _COLLECTIVE.search(line)
  if not match:
    return None
  results = [
      (dtype, tuple(int(d) for d in dims.split(",") if d))
      for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
  ]
  return match.group(2), results


def collectives(hlo_text: str) -> dict:
  """Per collective kind in a compiled module's text: how many run per call and their result
  bytes (a scanned layer's collectives count once per layer: while bodies by trip count)."""
  blocks, entry = _computations(hlo_text)
  runs = _executions(blocks, entry) if entry else {name: 1 for name in blocks}
  out: dict[str, dict] = {}
  for name, lines in blocks.items():
    for op in filter(None, map(collective_op, lines)):
      kind_name, results = op
      size = sum(math.prod(dims) * _BYTES.get(dtype, 4) for dtype, dims in results)
      kind = out.setdefault(kind_name, {"count": 0, "bytes": 0})
      kind["count"] += runs.get(name, 1)
      kind["bytes"] += size * runs.get(name, 1)
  return out


def memory(compiled) -> dict:
  analysis = compiled.memory_analysis()
  out = {
      k: int(getattr(analysis, f"{k}_size_in_bytes"))
      for k in ("argument", "output", "temp", "alias", "generated_code")
  }
  # live at once: the arguments, temporaries and the outputs not written over donated arguments
  out["total"] = out["argument"] + out["temp"] + max(out["output"] - out["alias"], 0)
  return out


_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w\-]+?)(?:\.\d+)* = ")


def custom_calls(hlo_text: str) -> dict:
  """Custom-call targets in a compiled module (a Pallas/Mosaic kernel is `tpu_custom_call`, a
  cuDNN one `__cudnn$fmha...`, ours on CPU `tailored_jax_flash_*`), with how many call sites;
  Mosaic kernels also by the kernel's own name (`tpu_custom_call:splash_mha_fwd_...`)."""
  out: dict[str, int] = {}
  for line in hlo_text.splitlines():
    target = _CUSTOM_CALL.search(line)
    if target:
      name = target.group(1)
      instruction = _INSTRUCTION.match(line)
      if name == "tpu_custom_call" and instruction:
        name = f"{name}:{instruction.group(1)}"
      out[name] = out.get(name, 0) + 1
  return out


def _compiled(compile_fn):
  """(compiled, None), or (None, the compiler's first line) when the program cannot fit the
  devices' memory (the TPU compiler refuses it: RESOURCE_EXHAUSTED)."""
  import jax

  try:
    return compile_fn(), None
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, str(e).splitlines()[0]


def step_model_flops(cfg, num_params: int) -> float:
  """The train step's model FLOPs (the whole batch): 6 per parameter per token trained (LM rows
  and self-reflection continuations), 2 per prefix token run under stop-gradient, and 2 more per
  trained token that model.remat='full' runs forward again. Attention's own FLOPs left out."""
  t = cfg.train
  sr_rows = t.sr_batch_size or t.batch_size
  continuations = 2 if t.sr_reuse_lm_forward else 3
  trained = t.batch_size * t.max_seq_len + sr_rows * continuations * t.max_continuation_len
  prefix = 0 if t.sr_reuse_lm_forward else sr_rows * max(t.max_seq_len - t.max_continuation_len, 8)
  recompute = 2 * trained if cfg.model.remat == "full" else 0
  return float(num_params) * (6 * trained + 2 * prefix + recompute)


def roofline(compiled, chip, model_flops_per_device: float) -> dict:
  """A step-time estimate from the model FLOPs at the chip's data-sheet bf16 peak, beside the
  compiler's cost analysis (which counts a while loop's body, the scanned layers, once)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      "model_flops_per_device": model_flops_per_device,
      "estimated_step_seconds": round(model_flops_per_device / (chip.bf16_tflops * 1e12), 4),
      "note": (
          "estimate: model FLOPs at the data-sheet bf16 peak (100% MFU; no attention FLOPs,"
          " memory or communication time): a lower bound"
      ),
      "compiler_flops_per_device": float(cost.get("flops", 0.0)),
      "compiler_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
      "compiler_note": "libtpu's cost analysis counts a while loop's body (scanned layers) once",
  }


def decode_step_estimate(compiled, chip, tokens: int) -> dict:
  """One decode step's time from the compiler's own cost analysis: its FLOPs at the chip's bf16
  peak or its bytes at the HBM bandwidth, whichever is longer, plus its collectives' bytes at the
  chip's ICI bandwidth (no latency, no overlap). An estimate to rank layouts by. `chip` (data-sheet
  peaks, `device_sheets.Peaks` or a `tpu_slices.Chip`) None: the compiler's numbers alone."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  moved = collectives(compiled.as_text())
  moved_bytes = sum(kind["bytes"] for kind in moved.values())
  estimate = {
      "compiler_flops_per_device": flops,
      "compiler_bytes_accessed_per_device": accessed,
      "collectives_per_token": moved,
      "collective_bytes_per_token": moved_bytes,
  }
  if chip is None:
    return estimate
  seconds = max(flops / (chip.bf16_tflops * 1e12), accessed / (chip.hbm_gb_per_s * 1e9))
  seconds += moved_bytes / (chip.ici_gb_per_s * 1e9)
  return dict(
      estimate,
      estimated_seconds_per_step=seconds,
      estimated_tokens_per_second=tokens / seconds if seconds else 0.0,
  )


def fastest_layout(layouts: dict) -> str | None:
  """The decode layout that fits and has the highest estimated tokens/s; without data-sheet
  estimates, the one that moves the fewest bytes between devices per token, then reads the
  fewest. None: none fits."""
  fitting = [name for name, entry in layouts.items() if entry["fits"]]
  if not fitting:
    return None
  if all("estimated_tokens_per_second" in layouts[name] for name in fitting):
    return max(fitting, key=lambda n: layouts[n]["estimated_tokens_per_second"])
  return min(
      fitting,
      key=lambda n: (
          layouts[n]["collective_bytes_per_token"],
          layouts[n]["compiler_bytes_accessed_per_device"],
      ),
  )


def compare_decode_layouts(cfg, train_model, mesh, chip, budget: int) -> dict:
  """One exam decode step (every slot one token) compiled for `mesh`'s devices in each decode
  layout: bytes per device, collectives per token and, with the chip's data sheet, the estimated
  tokens/s of the slice; `best_layout` is the fastest that fits (`fastest_layout`)."""
  from tailored_jax import exam_plan, sharding

  layouts = {}
  for layout in sharding.DECODE_LAYOUTS:
    program = exam_plan.exam_program(cfg, train_model, mesh, layout)
    compiled, error = _compiled(lambda: exam_plan.compile_step(program))
    entry = {
        "rows_over": list(program.row_axes),
        "copies_of_the_weights": program.row_shards if layout != "train" else 1,
        "weights_per_device": sharded_bytes(program.params),
    }
    if compiled is None:
      entry.update(fits=False, compiler_error=error)
    else:
      used = memory(compiled)
      entry.update(
          xla_bytes_per_device=used,
          fits=used["total"] <= budget,
          **decode_step_estimate(compiled, chip, program.slots),
      )
    layouts[layout] = entry
  how = (
      "time = max(compiler FLOPs / bf16 peak, compiler bytes / HBM bandwidth) + collective bytes"
      " / ICI bandwidth (data sheet; no latency or overlap): an estimate to rank layouts by"
      if chip is not None
      else "no data sheet for these devices: ranked by the bytes their collectives move per"
      " token, then the bytes a step reads"
  )
  return {
      "layouts": layouts,
      "best_layout": fastest_layout(layouts),
      "layouts_note": (
          f"one step of {cfg.exam.batch_size} x {cfg.exam.num_samples} slots per layout; {how}"
      ),
  }


def sharded_bytes(tree) -> int:
  """Bytes per device of a tree of ShapeDtypeStructs with shardings (the first device's shard)."""
  import jax
  import numpy as np

  total = 0
  for leaf in jax.tree.leaves(tree):
    if leaf is None:
      continue
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def model_config(preset: str, model_section):
  """The preset's architecture run as the config's `model` section says (dtypes, remat, scan,
  CPU attention)."""
  from tailored_jax.models.gpt2 import GPT2Config
  from tailored_jax.models.gptj import GPTJConfig
  from tailored_jax.models.layers import execution_of
  from tailored_jax.models.llama import LlamaConfig

  family, fields = PRESETS[preset]
  cls = {"gptj": GPTJConfig, "gpt2": GPT2Config, "llama": LlamaConfig}[family]
  return cls(**fields, **execution_of(model_section))


def _split_of(name: str, specs, shardings, mesh) -> int:
  """Over how many devices the weights' logical axis `name` is split."""
  import jax
  import numpy as np
  from jax.sharding import PartitionSpec

  is_spec = lambda x: isinstance(x, PartitionSpec)
  for spec, placed in zip(jax.tree.leaves(specs, is_leaf=is_spec), jax.tree.leaves(shardings)):
    if name in tuple(spec):
      axes = placed.spec[tuple(spec).index(name)]
      axes = axes if isinstance(axes, tuple) else (axes,)
      return int(np.prod([mesh.shape[a] for a in axes if a]))
  return 1


def abstract_batches(cfg, mesh) -> tuple:
  """The config's worst-case LM and self-reflection batches as shapes, dtypes and shardings:
  every row at `train.max_seq_len`, each reflection row a full prefix and continuations."""
  import jax
  import jax.numpy as jnp

  from tailored_jax import sharding
  from tailored_jax.data.batching import LMBatch, ReflectionBatch

  rows = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.decode_batch_sharding(mesh, len(shape), sharding.BATCH_AXES)
  )
  t = cfg.train
  b, seq = t.batch_size, t.max_seq_len
  lm = LMBatch(
      *(rows((b, seq), dtype) for dtype in (jnp.int32, jnp.int32, bool, bool, jnp.float32))
  )
  sr_rows, cont = t.sr_batch_size or b, t.max_continuation_len
  prefix = max(seq - cont, 8)
  reflection = ReflectionBatch(
      rows((sr_rows, prefix), jnp.int32),
      rows((sr_rows, prefix), bool),
      rows((sr_rows, 3, cont), jnp.int32),
      rows((sr_rows, 3, cont), bool),
      rows((sr_rows,), jnp.float32),
      rows((sr_rows,), jnp.int32) if t.sr_reuse_lm_forward and sr_rows < b else None,
  )
  return lm, reflection


def lower(
    cfg,
    preset: str,
    device_memory_gb: float = 80.0,
    compile_steps: bool = True,
    devices=None,
    topology: str = "",
    decode_layouts: bool = False,
) -> dict:
  """The planner's per-device bytes for `cfg` (a config: train/exam sizes, dtype, remat, mesh)
  with the preset's architecture, whether they fit `device_memory_gb` and the largest batch
  that does; with `compile_steps`, both steps also compiled and the compiler's figures beside
  them. `devices`: the mesh's (a TPU `topology`'s compile-only devices; default this
  process's). `decode_layouts` (TPU only): one exam decode step compiled in every decode layout
  and the fastest by the compiler's numbers (`compare_decode_layouts`)."""
  import jax

  from tailored_jax import sharding
  from tailored_jax import exam_plan
  from tailored_jax.models import model_for
  from tailored_jax.sample.memory import decode_memory
  from tailored_jax.train import memory as train_memory
  from tailored_jax.train.trainer import Trainer

  arch = model_config(preset, cfg.model)
  model = model_for(arch)
  mesh = sharding.make_mesh(cfg, devices)
  trainer = Trainer(model, cfg.train, mesh, cfg.method.reflection_loss)
  arch = trainer.model.cfg  # the attention chosen for the mesh's devices
  budget = int(device_memory_gb * train_memory.GB)
  auto_microbatches = cfg.train.microbatches == 0
  fewest = trainer.planner.fewest_microbatches(budget) if auto_microbatches else 0
  if fewest:
    trainer.use_microbatches(fewest)
  t = cfg.train
  b, seq = t.batch_size, t.max_seq_len
  lm, reflection = abstract_batches(cfg, mesh)
  sr_rows, cont = t.sr_batch_size or b, t.max_continuation_len
  prefix = max(seq - cont, 8)
  reference = trainer.abstract_state().params if cfg.method.reflection_loss == "dpo" else None
  train_args = (trainer.abstract_state(), lm, reflection, reference)
  planned = trainer.planner.plan()
  train_plan = {
      "planned_gb": planned.as_gb(),
      "device_memory_gb": device_memory_gb,
      "fits": planned.total <= budget,
      "largest_batch_that_fits": trainer.planner.largest_batch(budget),
  }

  e = cfg.exam
  exam = exam_plan.exam_program(cfg, trainer.model, mesh, cfg.mesh.decode_layout)
  params, row_axes = exam.params, exam.row_axes
  prompt = exam.prompt_len
  decode_rows = e.batch_size // exam.row_shards
  per_prompt = decode_memory(arch, prompt, e.max_new_tokens, e.num_samples)
  head_split = _split_of(
      "kv_heads", exam.param_specs, jax.tree.map(lambda a: a.sharding, params), mesh
  )
  exam_planned = {
      "planned_gb": {
          "parameters": round(sharded_bytes(params) / train_memory.GB, 3),
          "cache_and_buffers": round(
              per_prompt.total * max(decode_rows, 1) / head_split / train_memory.GB, 3
          ),
      }
  }
  on_tpu = mesh.devices.flat[0].platform == "tpu"
  report = {
      "compiler": "tpu" if on_tpu else "xla:cpu",
      "compiler_note": (
          f"libtpu's compiler for {topology} ({mesh.devices.flat[0].device_kind}), compile-only"
          if on_tpu
          else "XLA:CPU over forced host devices: a stand-in for a GPU compiler"
      ),
      "model": preset,
      "attention": arch.attention,
      "parameters": trainer.num_params,
      "dtype": arch.dtype,
      "param_dtype": arch.param_dtype,
      "remat": arch.remat,
      "scan_layers": arch.scan_layers,
      "mesh": dict(zip(sharding.MESH_AXES, mesh.devices.shape)),
      "devices": mesh.size,
      "slice": cfg.mesh.get("preset", ""),
      "train_step": {
          "batch": b,
          "seq_len": seq,
          "self_reflection_rows": sr_rows,
          "prefix": prefix,
          "continuation": cont,
          "microbatches": trainer.microbatches,
          "microbatches_chosen_by": "the planner" if auto_microbatches else "train.microbatches",
          "parameters_per_device": planned.parameters,
          "optimizer_per_device": planned.optimizer,
          **train_plan,
      },
      "exam_decode": {
          "prompts": e.batch_size,
          "samples": e.num_samples,
          "prompt_len": prompt,
          "new_tokens": e.max_new_tokens,
          "layout": exam.layout,
          "form": "continuous" if e.continuous_batching else "static",
          "rows_over": list(row_axes),
          "parameters_per_device": sharded_bytes(params),
          **exam_planned,
      },
  }
  if not compile_steps:
    return report
  tried = (
      [
          k
          for k in train_memory.microbatch_counts(trainer.planner.shape)
          if k >= trainer.microbatches
      ]
      if auto_microbatches
      else [trainer.microbatches]
  )
  for k in tried:  # the compiler's verdict: on a TPU it refuses a program its HBM cannot hold
    trainer.use_microbatches(k)
    train, train_error = _compiled(lambda: trainer.step_fn().lower(*train_args).compile())
    if train is not None:
      break
  if e.continuous_batching:
    compiled_exam, exam_error = _compiled(lambda: exam_plan.compile_continuous(exam))
    exam_compiled, insert_compiled = compiled_exam or (None, None)
  else:
    exam_compiled, exam_error = _compiled(lambda: exam_plan.compile_static(exam))
    insert_compiled = None
  step = report["train_step"]
  planned = trainer.planner.plan()
  step.update(
      microbatches=trainer.microbatches, planned_gb=planned.as_gb(), fits=planned.total <= budget
  )
  if train is None:
    step.update(fits=False, compiler_error=train_error, microbatches_tried=tried)
  else:
    train_memory_xla = memory(train)
    train_text = train.as_text()
    step.update(
        xla_bytes_per_device=train_memory_xla,
        inputs_from_shardings=sharded_bytes(train_args),
        planned_temp_over_xla_temp=round(planned.temporaries / max(train_memory_xla["temp"], 1), 3),
        collectives=collectives(train_text),
        custom_calls=custom_calls(train_text),
    )
  if exam_compiled is None:
    report["exam_decode"].update(fits=False, compiler_error=exam_error)
  else:
    exam_text = exam_compiled.as_text()
    report["exam_decode"].update(
        xla_bytes_per_device=memory(exam_compiled),
        collectives=collectives(exam_text),
        custom_calls=custom_calls(exam_text),
    )
    if insert_compiled is not None:
      report["exam_decode"]["insert"] = {
          "xla_bytes_per_device": memory(insert_compiled),
          "collectives": collectives(insert_compiled.as_text()),
      }
  if on_tpu and decode_layouts:
    report["exam_decode"].update(
        compare_decode_layouts(cfg, trainer.model, mesh, tpu_slices.parse(topology).chip, budget)
    )
  if on_tpu and train is not None:
    chip = tpu_slices.parse(topology).chip
    train_memory_xla = step["xla_bytes_per_device"]
    step["fits"] = train_memory_xla["total"] <= budget
    # the planner's largest batch against a budget scaled by how the compiler's temporaries
    # compare with the planner's at this batch
    ratio = train_memory_xla["temp"] / max(planned.temporaries, 1)
    fixed = planned.parameters + planned.optimizer
    step["largest_batch_that_fits"] = trainer.planner.largest_batch(
        int(fixed + (budget - fixed) / max(ratio, 1e-9))
    )
    step["largest_batch_note"] = "the planner's, calibrated by the compiled temporaries"
    step["roofline"] = roofline(train, chip, step_model_flops(cfg, trainer.num_params) / mesh.size)
  return report


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--config", required=True)
  parser.add_argument("--model", required=True, choices=sorted(PRESETS))
  parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
  parser.add_argument("--devices", type=int, default=8, help="how many devices the mesh spans")
  parser.add_argument(
      "--device_memory_gb",
      type=float,
      default=80.0,
      help="each device's memory, for 'fits' and the largest batch",
  )
  parser.add_argument(
      "--slice",
      default="",
      help="a mesh preset (config_lib.MESH_PRESETS): its devices, mesh, memory",
  )
  parser.add_argument(
      "--topology",
      default="",
      help="a TPU slice as libtpu names it (v5e:4x4, v4:2x2x4, v5p:2x2x2, v6e:2x4): compile with"
      " the TPU compiler for its devices, memory from the chip's HBM",
  )
  parser.add_argument(
      "--decode_layouts",
      action="store_true",
      help="with --topology: compile one exam decode step in every decode layout and name the"
      " fastest by the compiler's numbers",
  )
  parser.add_argument(
      "--no_compile",
      action="store_true",
      help="the planner's figures only (seconds), without XLA's",
  )
  args, overrides = parser.parse_known_args(argv)
  devices = None
  if args.topology:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu compiles; no TPU is opened
    try:
      tpu = tpu_slices.parse(args.topology)
      devices = tpu_slices.compile_only_devices(args.topology)
    except tpu_slices.TopologyError as e:
      sys.exit(f"error: --topology: {e}")
    args.devices, args.device_memory_gb = len(devices), tpu.chip.hbm_bytes / 1e9
    if args.mesh == parser.get_default("mesh"):
      args.mesh = f"1,{len(devices)},1"
  elif args.slice:
    from tailored_jax.config_lib import MESH_PRESETS, mesh_preset

    if args.slice not in MESH_PRESETS:
      sys.exit(
          f"error: --slice={args.slice!r} is not one of {sorted(MESH_PRESETS)} (TPU slices:"
          " --topology)"
      )
    count, memory_gb, sizes = mesh_preset(args.slice)
    args.devices, args.device_memory_gb, args.mesh = count, memory_gb, ",".join(map(str, sizes))
  if not args.topology and "--xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""
  ):
    env = dict(
        os.environ,
        XLA_FLAGS=(
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        ),
        JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
    )
    sys.exit(subprocess.call([sys.executable, "-m", "tailored_jax.plan", *argv], env=env))
  from tailored_jax import config_lib

  cfg = config_lib.from_file(args.config)
  try:
    config_lib.apply_overrides(cfg, overrides)
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
  except (config_lib.ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  cfg.mesh.update(data=data, fsdp=fsdp, tensor=tensor, num_devices=args.devices, preset=args.slice)
  try:
    report = lower(
        cfg,
        args.model,
        args.device_memory_gb,
        not args.no_compile,
        devices,
        args.topology,
        args.decode_layouts,
    )
  except ValueError as e:  # e.g. a batch the mesh's batch axes do not divide
    sys.exit(
        f"error: {args.config} on mesh {args.mesh} over {args.devices} devices: "
        f"{str(e).splitlines()[0]}"
    )
  print(json.dumps(report, indent=2))
  if args.topology and not report["train_step"]["fits"]:
    step = report["train_step"]
    needs = (
        step["compiler_error"]
        if "compiler_error" in step
        else f"{step['xla_bytes_per_device']['total'] / 1e9:.2f} GB per device"
    )
    sys.exit(
        f"error: the train step does not fit {args.topology} (HBM {args.device_memory_gb:.2f} GB"
        f" per chip) in {step['microbatches']} microbatch(es): {needs}; the planner's largest"
        f" batch: {step['largest_batch_that_fits']}"
    )


if __name__ == "__main__":
  main()
