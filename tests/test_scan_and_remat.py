"""The layer scan, the remat policies and the blockwise training attention: the same maths as the
per-layer loop and the fused attention, with less memory and one compiled layer."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailored_jax import sharding
from tailored_jax.data.batching import LMBatch, ReflectionBatch
from tailored_jax.models import layers
from tailored_jax.models.attention import blockwise as blockwise_lib
from tailored_jax.models.attention import cached as cached_lib
from tailored_jax.models.attention import cpu_native, fused, masks
from tailored_jax.models.attention.contexts import ContextKV
from tailored_jax.models.llama import Llama
from tailored_jax.train import step as step_lib
from tailored_jax.train.trainer import Trainer
from tests.test_model_and_decode import CFG, _batch, _mesh_cfg, _train_cfg


@pytest.mark.parametrize("window, tile_bytes", [(0, 0), (9, 0), (9, 1)])
def test_blockwise_attention_equals_dot_product_attention(window, tile_bytes, monkeypatch):
  """tile_bytes = 1: one row per map step (`blockwise.row_tiles`)."""
  if tile_bytes:
    monkeypatch.setattr(blockwise_lib, "ATTENTION_TILE_BYTES", tile_bytes)
  b, t, n, kv, h = 3, 37, 4, 2, 8
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, t, kv, h))
  v = jax.random.normal(keys[2], (b, t, kv, h))
  valid = np.ones((b, t), bool)
  valid[1, 30:] = False  # right padding
  valid[2, :5] = False  # left padding
  weights = jnp.asarray(valid[:, :, None, None] * np.arange(1, h + 1), jnp.float32)

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(jnp.where(valid[:, :, None, None], out, 0.0) * weights), out

  fused = lambda q, k, v: jax.nn.dot_product_attention(
      q,
      k,
      v,
      mask=jnp.asarray(valid)[:, None, None, :],
      is_causal=True,
      local_window_size=(window - 1, 0) if window else None,
  )
  blockwise = lambda q, k, v: blockwise_lib.blockwise_causal_attention(
      q, k, v, jnp.asarray(valid), jnp.float32, window, block=16
  )
  grads = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), (0, 1, 2), has_aux=True))
  (_, expected), expected_grads = grads(fused)(q, k, v)
  (_, got), got_grads = grads(blockwise)(q, k, v)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid], atol=2e-5)
  for a, e in zip(got_grads, expected_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=5e-5)


@pytest.mark.parametrize("window, tile_bytes", [(0, 0), (11, 0), (11, 1)])
def test_context_attention_equals_the_cached_attention(window, tile_bytes, monkeypatch):
  """Self-reflection's training attention (rows after a read-only prefix shared by groups of
  rows: two flash parts merged, and the fused form used off CPU) gives the cache path's output
  and gradients, the prefix's keys and values included (DPO differentiates through them);
  tile_bytes = 1: one group of rows per map step."""
  if tile_bytes:
    monkeypatch.setattr(blockwise_lib, "ATTENTION_TILE_BYTES", tile_bytes)
  groups, per_group, t, s, n, kv, h = 2, 3, 37, 21, 4, 2, 8
  b = groups * per_group
  keys = jax.random.split(jax.random.PRNGKey(2), 6)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, t, kv, h))
  v = jax.random.normal(keys[2], (b, t, kv, h))
  context_k = jax.random.normal(keys[3], (groups, kv, s, h))
  context_v = jax.random.normal(keys[4], (groups, kv, s, h))
  positions_gs = np.tile(np.arange(s) - 4, (groups, 1))  # left-padded prefixes
  positions_gs[1] = np.arange(s) - 9
  positions_gs = np.where(positions_gs >= 0, positions_gs, -1)
  prefix_len = (positions_gs >= 0).sum(1).repeat(per_group)
  valid = np.ones((b, t), bool)
  valid[1, 30:] = False  # right-padded continuations
  valid[4, 12:] = False
  positions_bt = jnp.asarray(prefix_len[:, None] + np.arange(t))
  context_mask = masks.context_mask(jnp.asarray(positions_gs), positions_bt, window)
  out_weights = jax.random.normal(keys[5], (b, t, n, h)) * valid[:, :, None, None]

  def cached(q, k, v, context_k, context_v):
    zeros = jnp.zeros((b, kv, t, h))
    layer = cached_lib.LayerKV(
        zeros,
        zeros,
        jnp.asarray(0),
        masks.attention_mask(jnp.asarray(valid), jnp.asarray(0), t, window),
        (context_k,),
        (context_v,),
        (context_mask,),
    )
    return cached_lib.cached_attention(q, k, v, layer, jnp.float32)[0]

  def training(form):
    return lambda q, k, v, context_k, context_v: form(
        q,
        k,
        v,
        jnp.asarray(valid),
        ContextKV(context_k, context_v, context_mask),
        jnp.float32,
        window,
    )

  blockwise = lambda *a: blockwise_lib.blockwise_context_attention(
      *a[:5], jnp.float32, window, block=16
  )
  runs = {
      "cached": cached,
      "blockwise": training(blockwise),
      "fused": training(fused.fused_context_attention),
  }
  results = {
      name: jax.jit(
          jax.value_and_grad(lambda *a, fn=fn: jnp.sum(fn(*a) * out_weights), (0, 1, 2, 3, 4))
      )(q, k, v, context_k, context_v)
      for name, fn in runs.items()
  }
  expected, expected_grads = results.pop("cached")
  for got, got_grads in results.values():
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    for a, e in zip(got_grads, expected_grads):
      np.testing.assert_allclose(a, e, atol=5e-5)


@pytest.mark.parametrize(
    "x_shape, w_shape", [((3, 5, 8), (8, 24)), ((3, 5, 24), (24, 8)), ((2, 7, 8), (8, 2, 4))]
)
def test_dense_gradient_equals_the_matmuls(x_shape, w_shape):
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
  out_weights = jax.random.normal(keys[2], x_shape[:-1] + w_shape[1:])
  plain = lambda x, w: jnp.tensordot(x, w, axes=1)
  grads = lambda fn: jax.jit(
      jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w) * out_weights), (0, 1))
  )(x, w)
  (expected, expected_grads), (got, got_grads) = grads(plain), grads(
      lambda x, w: layers.dense(x, w, "cpu")
  )
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  for a, e in zip(got_grads, expected_grads):
    assert a.shape == e.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, params, lm, reflection):
  loss = lambda p: (
      step_lib.lm_forward_loss(model, p, lm)[0]
      + 0.5 * step_lib.self_reflection_loss(model, p, reflection, 1.0)
  )
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def loop_run():
  params = nn.meta.unbox(layers.init_boxed_params(Llama(CFG), jax.random.PRNGKey(0)))
  lm, reflection = jax.tree.map(jnp.asarray, _batch(np.random.default_rng(0)))
  return params, (lm, reflection), _loss_and_grads(Llama(CFG), params, lm, reflection)


@pytest.mark.parametrize("remat", ["none", "minimal", "save_attention"])
def test_scanned_loss_and_gradients_equal_the_per_layer_loop(loop_run, remat):
  """LM + self-reflection (the prefix's stacked cache included) from the same weights ('full'
  is checked against the loop on a mesh in the activation layout test)."""
  params, batch, (loop_loss, loop_grads) = loop_run
  scanned = Llama(dataclasses.replace(CFG, scan_layers=True, remat=remat))
  stacked = layers.stack_layers(jax.tree.map(lambda x: x, params), CFG.n_layers)
  loss, grads = _loss_and_grads(scanned, stacked, *batch)
  np.testing.assert_allclose(loss, loop_loss, rtol=1e-6)
  grads = layers.unstack_layers(grads)
  assert jax.tree.structure(grads) == jax.tree.structure(loop_grads)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(loop_grads)):
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _lowered_lm_step(cfg, batch, seq, prefix=0):
  """The train step lowered on abstract arguments; with `prefix`, reflection rows too (a prefix
  and continuations of `seq` - `prefix` tokens)."""
  trainer = Trainer(Llama(cfg), _train_cfg(), sharding.make_mesh(_mesh_cfg(1, 1, 1, 1)))
  rows = lambda dtype, *shape: jax.ShapeDtypeStruct(shape or (batch, seq), dtype)
  lm = LMBatch(rows(jnp.int32), rows(jnp.int32), rows(bool), rows(bool), rows(jnp.float32))
  reflection = prefix and ReflectionBatch(
      rows(jnp.int32, batch, prefix),
      rows(bool, batch, prefix),
      rows(jnp.int32, batch, 3, seq - prefix),
      rows(bool, batch, 3, seq - prefix),
      rows(jnp.float32, batch),
  )
  return trainer.step_fn().lower(trainer.abstract_state(), lm, reflection or None)


def _compiled_lm_step(cfg, batch, seq):
  return _lowered_lm_step(cfg, batch, seq).compile()


def test_scan_compiles_one_layer_and_full_remat_keeps_only_block_inputs():
  deep = dataclasses.replace(CFG, n_layers=4, d_model=64, d_ff=256)
  scan = lambda n, remat: dataclasses.replace(deep, n_layers=n, scan_layers=True, remat=remat)
  # the compiled program does not grow with depth under the scan
  size = lambda cfg: len(_compiled_lm_step(cfg, 4, 16).as_text().splitlines())
  assert size(scan(8, "full")) < 1.1 * size(scan(2, "full"))  # 8 layers as 2
  temp = lambda cfg: _compiled_lm_step(cfg, 4, 128).memory_analysis().temp_size_in_bytes
  kept_everything, kept_inputs = temp(deep), temp(scan(4, "full"))
  assert kept_inputs < 0.5 * kept_everything, (kept_inputs, kept_everything)


@pytest.mark.parametrize("kernel", ["cpu_blockwise", "cpu_native"])
@pytest.mark.parametrize("reflection", [False, True])
def test_save_attention_runs_the_attention_forward_once(reflection, kernel):
  """Under 'save_attention' the flash attention's inputs and outputs (its backward's residuals)
  are kept, so the step has as much attention work (the XLA form's exponentials: each query
  block's scores, forward and backward, and the continuations' merge; the native kernel's
  forward calls) as with nothing recomputed; 'full' runs the forward again. With reflection
  rows the continuations attend after their prefix."""
  if kernel == "cpu_native" and not cpu_native.available():
    pytest.skip("no C++ compiler")
  cfg = lambda remat: dataclasses.replace(CFG, scan_layers=True, remat=remat, attention=kernel)

  def attention_work(remat):  # (exponentials in the attention (the loss has its own), kernels)
    text = _lowered_lm_step(cfg(remat), 4, 256, 128 if reflection else 0).as_text(debug_info=True)
    in_attention = {
        loc for loc, where in re.findall(r"^(#loc\d+) = (.*)$", text, re.M) if "/attn/" in where
    }
    exps = sum(
        loc in in_attention
        for loc in re.findall(r"stablehlo\.exponential .*loc\((#loc\d+)\)$", text, re.M)
    )
    return exps, text.count(f"custom_call @{cpu_native.FORWARD}(")

  kept_everything = attention_work("none")
  if not reflection:  # 2 query blocks of 128, forward and backward; or one kernel call
    assert kept_everything == ((4, 0) if kernel == "cpu_blockwise" else (0, 1))
  recomputed = attention_work("full")
  assert attention_work("save_attention") == kept_everything
  assert sum(recomputed) > sum(kept_everything)
  assert all(r >= k for r, k in zip(recomputed, kept_everything))


def test_decoding_refuses_stacked_weights():
  from tailored_jax.sample import decode

  scanned = Llama(dataclasses.replace(CFG, scan_layers=True))
  params = Trainer(scanned, _train_cfg(), sharding.make_mesh(_mesh_cfg(1, 1, 1, 1))).init_params(0)
  decoder = decode.Decoder(scanned, decode.StopTables.never_stop(CFG.vocab_size))
  with pytest.raises(ValueError, match="per-layer weights"):
    decoder.prefill(params, jnp.zeros((4,), jnp.int32))
  assert decoder.prefill(layers.unstack_layers(params), jnp.zeros((4,), jnp.int32)).length == 4


def test_remat_policies_are_checked_and_old_workdirs_still_load():
  from tailored_jax import config_lib

  with pytest.raises(ValueError, match="model.remat: 'some'"):
    layers.remat_policy("some")
  cfg = config_lib.base_config()
  cfg.model.remat = "some"
  with pytest.raises(config_lib.ConfigError, match="config field model.remat: must be one of"):
    config_lib.validate(cfg)
  saved = json.loads(config_lib.base_config().to_json())
  for old, new in ((True, "full"), (False, "none")):  # config.json written before the policies
    saved["model"]["remat"] = old
    assert config_lib.from_saved(saved).model.remat == new


SHARDED = dataclasses.replace(CFG, n_kv_heads=4)


def test_activation_layouts_give_one_devices_loss_and_updates(monkeypatch):
  """LM + self-reflection steps from the same weights: the per-layer model on one device and on
  a mixed (2, 2, 2) mesh, the scanned one on a Megatron-style (1, 2, 4) mesh and on (2, 2, 2)
  with the attention one row (group) of each device per map step."""
  assert jax.device_count() == 8, "tests/conftest.py asks for 8 host devices"
  initial = jax.device_get(
      nn.meta.unbox(layers.init_boxed_params(Llama(SHARDED), jax.random.PRNGKey(0)))
  )
  scanned = dataclasses.replace(SHARDED, scan_layers=True, remat="full")
  runs = (
      ((1, 1, 1, 1), SHARDED, 0),
      ((2, 2, 2, 0), SHARDED, 0),
      ((1, 2, 4, 0), scanned, 0),
      ((2, 2, 2, 0), scanned, 1),
  )
  results, default_tile = [], blockwise_lib.ATTENTION_TILE_BYTES
  for mesh_shape, cfg, tile_bytes in runs:
    monkeypatch.setattr(blockwise_lib, "ATTENTION_TILE_BYTES", tile_bytes or default_tile)
    trainer = Trainer(Llama(cfg), _train_cfg(), sharding.make_mesh(_mesh_cfg(*mesh_shape)))
    params = jax.tree.map(jnp.asarray, initial)
    if cfg.scan_layers:
      params = layers.stack_layers(params, cfg.n_layers)
    state = trainer.new_state(jax.device_put(params, trainer.param_shardings))
    rng = np.random.default_rng(0)
    for _ in range(2):
      lm, reflection = _batch(rng)
      state, metrics = trainer.step_fn()(
          state, trainer.put_batch(lm), trainer.put_batch(reflection)
      )
    results.append((layers.unstack_layers(jax.device_get(state.params)), jax.device_get(metrics)))
    if mesh_shape == (2, 2, 2, 0) and not cfg.scan_layers:
      assert state.params["layer_0"]["attn"]["wq"].sharding.spec == jax.sharding.PartitionSpec(
          "fsdp", "tensor", None
      )
    if cfg.scan_layers:  # the stacked layer axis stays whole
      assert state.params["layers"]["attn"]["wq"].sharding.spec == jax.sharding.PartitionSpec(
          None, "fsdp", "tensor", None
      )
  (p1, m1), *others = results
  assert m1["sr_loss"] > 0 and m1["sr_examples"] == 6
  for params, metrics in others:
    np.testing.assert_allclose(metrics["loss"], m1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p1)):
      np.testing.assert_allclose(a, b, atol=2e-5)


def test_fsdp_reduces_weights_not_activations():
  """Over (1, 8, 1) the step gathers weights and reduces gradients: no all-reduce result is
  larger than the largest weight (splitting an activation's contraction over fsdp would
  all-reduce [batch, tokens, mlp] partial sums)."""
  from tailored_jax import plan

  cfg = dataclasses.replace(SHARDED, d_model=64, d_ff=256, scan_layers=True, remat="full")
  trainer = Trainer(Llama(cfg), _train_cfg(), sharding.make_mesh(_mesh_cfg(1, 8, 1, 0)))
  rows = lambda dtype: jax.ShapeDtypeStruct(
      (16, 64), dtype, sharding=sharding.batch_sharding(trainer.mesh, 2)
  )
  lm = LMBatch(rows(jnp.int32), rows(jnp.int32), rows(bool), rows(bool), rows(jnp.float32))
  hlo = trainer.step_fn().lower(trainer.abstract_state(), lm, None).compile().as_text()
  largest_weight = max(np.prod(a.shape) * 4 for a in jax.tree.leaves(trainer.abstract_params))
  sizes = [
      np.prod([int(d) for d in dims.split(",") if d]) * 4
      for line in hlo.splitlines()
      if plan._COLLECTIVE.search(line) and " all-reduce" in line
      for dims in re.findall(r"f32\[([\d,]*)\]", line.split(" all-reduce")[0])
  ]
  assert sizes and max(sizes) <= largest_weight, (max(sizes), largest_weight)
