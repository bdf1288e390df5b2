"""Continuous batching (`generate_texts(continuous=True)`): decode slots refilled as rows stop give
the texts static batches give, for greedy and sampled rows, rows of very different lengths, a
sliding window, a shared prefix, a small memory budget and rows split over 8 devices."""

import dataclasses
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from tailored_jax import config_lib, exam_plan, plan, sharding
from tailored_jax.models import build_model, for_devices, kv_cache, layers
from tailored_jax.models.attention import cached, cpu_decode
from tailored_jax.models.llama import Llama, LlamaConfig
from tailored_jax.sample import decode, memory, prefill, sampling
from tailored_jax.sample.runner import generate_texts
from tailored_jax.train.trainer import Trainer
from tests.test_model_and_decode import _train_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = LlamaConfig(
    vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
BUDGET = 12
PROMPTS = [
    "the quick brown fox " + q
    for q in (
        "a",
        "hello world",
        "xyz",
        "qq",
        "mnop",
        "sphinx of black quartz judge my vow",
        "b",
        "cc",
        "dddd",
        "pack my box with five dozen liquor jugs",
        "eeeee ff",
    )
]


class Letters:  # one token per letter a..z and space, ids 3..29; pad 0, bos 2
  pad_id = 0

  def encode_batch(self, texts):
    return [[2] + [3 + (26 if c == " " else ord(c) - ord("a")) for c in t] for t in texts]

  def decode_batch(self, rows):
    return [",".join(str(int(t)) for t in row) for row in rows]


def _params(model, seed=0):
  return nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(seed)))


def _mesh(data=-1, fsdp=1, tensor=1, num_devices=1):
  return sharding.make_mesh(
      ml_collections.ConfigDict(
          {"mesh": dict(data=data, fsdp=fsdp, tensor=tensor, num_devices=num_devices)}
      )
  )


def _stop_on(tokens) -> decode.StopTables:
  """Rows stop at any of `tokens` (as a blank line would stop them); pad and bos never drawn."""
  tables = decode.StopTables.never_stop(CFG.vocab_size)
  blank = np.zeros(CFG.vocab_size, bool)
  blank[list(tokens)] = True
  never = np.zeros(CFG.vocab_size, bool)
  never[[0, 2]] = True
  return tables.replace(blank_line_v=blank, never_v=never)


def _run(model, params, tables, *, continuous, batch_size, samples, mesh=None, **options):
  decoder = decode.Decoder(model, tables)
  texts = generate_texts(
      decoder,
      params,
      Letters(),
      PROMPTS,
      mesh=mesh or _mesh(),
      num_samples=samples,
      sampling=sampling.SamplingConfig(1.0, 10, 1.0) if samples > 1 else sampling.SamplingConfig(),
      max_new_tokens=BUDGET,
      batch_size=batch_size,
      rng=jax.random.PRNGKey(7),
      label="exam",
      continuous=continuous,
      **options,
  )
  return texts, decoder


def _lengths(texts) -> list[int]:
  return [len(t.split(",")) if t else 0 for row in texts for t in row]


def _on_cpu(model, native: bool, monkeypatch):
  """`model` resolved for the CPU devices (decode steps then read a row's own keys with the native
  kernel, `cpu_decode`), counting the kernel's uses; or as it is (the XLA form)."""
  uses = []
  if native:
    kernel = cpu_decode.part
    monkeypatch.setattr(cpu_decode, "part", lambda *a: uses.append(1) or kernel(*a))
    model = for_devices(model, jax.devices()[:1])
  return model, uses


@pytest.mark.parametrize("native", [False, True])
def test_slots_refilled_as_rows_stop_give_each_row_its_own_greedy_tokens(native, monkeypatch):
  """Rows of very different lengths (1 token to the whole budget): two slots refilled ten times,
  the last row moved to a slot of its own, give every prompt exactly the tokens it decodes alone
  up to its first stop token, as static batches do; with the XLA form and the native CPU
  kernel."""
  model, uses = _on_cpu(Llama(CFG), native, monkeypatch)
  params = _params(model)
  free_run, _ = _run(
      model, params, _stop_on([]), continuous=False, batch_size=len(PROMPTS), samples=1
  )
  rows = [[int(t) for t in row[0].split(",")] for row in free_run]
  stops = {rows[i][0] for i in (0, 3)} | {rows[5][4]}  # some rows stop at once, some later
  expected = []
  for row in rows:
    cut = next((n + 1 for n, t in enumerate(row) if t in stops), len(row))
    expected.append([",".join(map(str, row[:cut]))])
  lengths = _lengths(expected)
  assert min(lengths) == 1 and max(lengths) == BUDGET and len(set(lengths)) >= 3
  continuous, decoder = _run(
      model, params, _stop_on(stops), continuous=True, batch_size=2, samples=1
  )
  static, _ = _run(model, params, _stop_on(stops), continuous=False, batch_size=4, samples=1)
  assert continuous == expected
  assert static == expected
  inserts = {shape for shape in decoder._shapes if shape[0] == "insert"}
  assert inserts and all(shape[1] == 2 for shape in inserts)  # two slots while rows start
  # the last row, once no other is left to start, finishes alone in one slot
  assert ("advance", 1, BUDGET) in {shape[:3] for shape in decoder._shapes}
  assert bool(uses) == native


@pytest.mark.parametrize("native", [False, True])
def test_sampled_rows_keep_their_keys_per_prompt_and_sample(native, monkeypatch):
  """k = 3 samples per prompt on 6 slots: each (prompt, sample) draws what it draws in a static
  batch, wherever and whenever its slot runs; samples stop at different lengths. A sliding
  window shorter than the budget: each slot's window over its own tokens is its own. With the
  XLA form and the native CPU kernel."""
  model, uses = _on_cpu(Llama(dataclasses.replace(CFG, sliding_window=5)), native, monkeypatch)
  params = _params(model, seed=3)
  tables = _stop_on([5, 11])
  static, _ = _run(model, params, tables, continuous=False, batch_size=4, samples=3)
  continuous, _ = _run(model, params, tables, continuous=True, batch_size=2, samples=3)
  assert continuous == static
  lengths = _lengths(static)
  assert min(lengths) <= 2 and max(lengths) == BUDGET
  assert len({s for row in static for s in row}) > len(PROMPTS)  # samples differ
  assert bool(uses) == native


def test_a_small_memory_budget_gives_fewer_slots_and_the_same_texts(caplog):
  model = Llama(CFG)
  params = _params(model)
  tables = _stop_on([5, 11])
  with caplog.at_level("INFO"):
    roomy, _ = _run(model, params, tables, continuous=True, batch_size=8, samples=2)
    tight, decoder = _run(
        model,
        params,
        tables,
        continuous=True,
        batch_size=8,
        samples=2,
        memory_budget_bytes=100_000,
    )
  assert roomy == tight
  slots = [r.getMessage() for r in caplog.records if "decode slots" in r.getMessage()]
  assert slots[0].startswith("exam: 16 decode slots (8 prompts x 2 samples)")
  assert slots[1].startswith("exam: 2 decode slots (1 prompts x 2 samples)")
  assert {shape[1] for shape in decoder._shapes if shape[0] == "insert"} == {2}


def test_slots_over_eight_devices_in_the_model_parallel_layout():
  """Rows split over the mesh axes no weight uses (data × fsdp of a (2, 2, 2) mesh), the weights
  in the model-parallel decode layout: the texts of one device's static batches, and each
  device holds its rows' keys and values for its own heads only."""
  model = Llama(CFG)
  params = _params(model, seed=5)
  tables = _stop_on([5, 11])
  reference, _ = _run(model, params, tables, continuous=False, batch_size=4, samples=2)
  mesh = _mesh(2, 2, 2, 0)
  trainer = Trainer(model, _train_cfg(), mesh)
  placed = jax.device_put(
      params,
      sharding.decode_shardings(
          trainer.param_specs, trainer.abstract_params, mesh, "model_parallel"
      ),
  )
  texts, _ = _run(
      model,
      placed,
      tables,
      continuous=True,
      batch_size=4,
      samples=2,
      mesh=mesh,
      decode_layout="model_parallel",
  )
  assert texts == reference
  # the slots' keys and values split over the heads as the weights writing them are
  heads = sharding.decode_head_axes("model_parallel", mesh, CFG)
  assert heads == ("tensor",)
  state = decode.Decoder(model, tables).empty_slots(
      None,
      slots=8,
      prompt_slots=16,
      max_new_tokens=BUDGET,
      mesh=mesh,
      row_axes=("data", "fsdp"),
      head_axes=heads,
  )
  for buffer in (state.cache.keys[0], state.cache.context[-1].values[1]):
    assert buffer.sharding.shard_shape(buffer.shape) == (2, 1, buffer.shape[2], CFG.head_dim)


def test_a_bfloat16_cache_holds_keys_and_values_rounded_once_and_half_the_bytes():
  """`model.kv_cache_dtype=bfloat16` on a float32 model: the first layer's prompt keys are the
  float32 ones rounded, the slots hold bfloat16 buffers, the memory plan counts half the cache, and
  continuous batching still gives the static batches' draws."""
  model = Llama(CFG)
  rounded = Llama(dataclasses.replace(CFG, kv_cache_dtype="bfloat16"))
  params = _params(model, seed=2)
  tokens = np.asarray(Letters().encode_batch(["hello world"]), np.int32)
  valid = np.ones_like(tokens, bool)
  full = decode.Decoder(model, _stop_on([]))
  half = decode.Decoder(rounded, _stop_on([]))
  logits, context, first = prefill.prefill_prompts(params, tokens, valid, None, model=full.model)
  logits_r, context_r, first_r = prefill.prefill_prompts(
      params, tokens, valid, None, model=half.model
  )
  bf16 = jax.numpy.bfloat16
  assert context_r.keys[1].dtype == bf16
  # the first layer's keys and values are the float32 ones rounded; later layers read rounded
  # ones (the prefill attends through the cache), so theirs are near, not equal
  np.testing.assert_array_equal(context_r.keys[0], context.keys[0].astype(bf16))
  np.testing.assert_array_equal(context_r.values[0], context.values[0].astype(bf16))
  np.testing.assert_allclose(context_r.keys[1].astype(np.float32), context.keys[1], atol=0.05)
  np.testing.assert_allclose(logits_r, logits, atol=0.05)
  assert int(first_r[0]) == int(first[0]) == tokens.shape[1]
  slots = half.empty_slots(
      None, slots=4, prompt_slots=8, max_new_tokens=BUDGET, mesh=_mesh(), row_axes=("data",)
  )
  assert {leaf.dtype for leaf in slots.cache.keys + slots.cache.context[0].values} == {
      jax.numpy.dtype("bfloat16")
  }
  plan = lambda cfg: memory.decode_memory(cfg, 32, BUDGET, 2).kv_cache
  assert plan(rounded.cfg) * 2 == plan(model.cfg)
  tables = _stop_on([5, 11])
  static, _ = _run(rounded, params, tables, continuous=False, batch_size=4, samples=2)
  continuous, _ = _run(rounded, params, tables, continuous=True, batch_size=2, samples=2)
  assert continuous == static


def test_an_int8_cache_keeps_a_scale_per_token_and_head_and_attends_as_its_dequantized_values():
  """`model.kv_cache_dtype=int8`: a vector's scale is its absolute maximum / 127; the first
  layer's prompt keys are the float32 ones quantized; attention over an int8 buffer (scales on
  the scores and weights) equals attention over its dequantized values; the memory plan counts
  1 + 4/head_dim bytes an element; continuous batching gives the static batches' draws."""
  q = kv_cache.quantize_int8(jax.numpy.asarray([[0.5, -1.27, 0.0, 0.004]]))
  np.testing.assert_array_equal(q.q, [[50, -127, 0, 0]])
  np.testing.assert_allclose(q.scale, [[0.01]], rtol=1e-6)
  model = Llama(CFG)
  quantized = Llama(dataclasses.replace(CFG, kv_cache_dtype="int8"))
  params = _params(model, seed=2)
  tokens = np.asarray(Letters().encode_batch(["hello world"]), np.int32)
  valid = np.ones_like(tokens, bool)
  _, context, _ = prefill.prefill_prompts(params, tokens, valid, None, model=model)
  logits_q, context_q, _ = prefill.prefill_prompts(params, tokens, valid, None, model=quantized)
  first = kv_cache.quantize_int8(context.keys[0])
  np.testing.assert_array_equal(context_q.keys[0].q, first.q)
  np.testing.assert_array_equal(context_q.keys[0].scale, first.scale)
  assert context_q.values[1].q.dtype == np.int8 and context_q.values[1].scale.shape == (
      1,
      CFG.n_kv_heads,
      tokens.shape[1],
      1,
  )
  # two queries per kv head over the prompt's int8 keys and values, and over their float32 values
  q_bkxh = jax.random.normal(jax.random.PRNGKey(3), (1, CFG.n_kv_heads, 2, CFG.head_dim))
  mask_bxs = np.ones((1, 2, tokens.shape[1]), bool)
  k8, v8 = context_q.keys[1], context_q.values[1]
  as_int8 = cached.attend_part(q_bkxh, k8, v8, mask_bxs, jax.numpy.float32, 0.5)
  as_float = cached.attend_part(
      q_bkxh, kv_cache.dequantize(k8), kv_cache.dequantize(v8), mask_bxs, jax.numpy.float32, 0.5
  )
  for a, b in zip(as_int8, as_float):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(kv_cache.dequantize(k8) - context.keys[1])) < 0.05
  plan = lambda cfg: memory.decode_memory(cfg, 32, BUDGET, 2).kv_cache
  assert plan(quantized.cfg) == plan(model.cfg) * (1 + 4 / CFG.head_dim) / 4
  tables = _stop_on([5, 11])
  static, _ = _run(quantized, params, tables, continuous=False, batch_size=4, samples=2)
  continuous, _ = _run(quantized, params, tables, continuous=True, batch_size=2, samples=2)
  assert continuous == static


def test_an_auto_decode_layout_is_the_one_the_compiler_says_moves_least_and_fits(monkeypatch):
  """`mesh.decode_layout=auto` on 8 CPU devices (no data sheet): the compiled decode steps'
  collectives rank the layouts (replicated moves nothing per token, the training layout gathers
  weights), and a memory budget that replicated weights exceed takes model_parallel."""
  cfg = config_lib.from_file(os.path.join(ROOT, "configs", "quickstart.py"))
  cfg.exam.update(batch_size=8, num_samples=2, max_new_tokens=16)
  cfg.train.max_seq_len = 64
  cfg.mesh.update(data=2, fsdp=2, tensor=2, num_devices=8)
  mesh = sharding.make_mesh(cfg)
  model = for_devices(build_model(cfg.model, 64), mesh.devices.flat)
  compared = plan.compare_decode_layouts(cfg, model, mesh, None, 2**40)
  layouts = compared["layouts"]
  moved = {name: entry["collective_bytes_per_token"] for name, entry in layouts.items()}
  assert moved["replicated"] == 0 < moved["model_parallel"] < moved["train"], moved
  assert compared["best_layout"] == plan.fastest_layout(layouts) == "replicated"
  used = {name: entry["xla_bytes_per_device"]["total"] for name, entry in layouts.items()}
  assert used["model_parallel"] < used["replicated"], used
  between = (used["model_parallel"] + used["replicated"]) // 2
  assert exam_plan.choose_decode_layout(cfg, model, mesh, between) == "model_parallel"
  none_fit = {n: dict(e, fits=False) for n, e in layouts.items()}
  assert plan.fastest_layout(none_fit) is None
  monkeypatch.setattr(
      plan, "compare_decode_layouts", lambda *_: dict(compared, layouts=none_fit, best_layout=None)
  )
  with pytest.raises(ValueError, match="mesh.decode_layout=auto: no decode layout"):
    exam_plan.choose_decode_layout(cfg, model, mesh, 1)
