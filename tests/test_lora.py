"""LoRA students: adapters on every projection of both families, the frozen base, a LoRA layer's
gradient against the hand-computed one, merged and unmerged weights giving the same logits and
greedy tokens, and a tiny LoRA round that learns."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailored_jax import config_lib, sharding
from tailored_jax.models import for_decoding, layers, lora
from tailored_jax.models.gptj import GPTJ, GPTJConfig
from tailored_jax.models.llama import Llama, LlamaConfig
from tailored_jax.sample import decode, sampling
from tailored_jax.train.trainer import Trainer
from tests.test_model_and_decode import _batch, _mesh_cfg, _train_cfg, fixed_batch_losses

ALL = ("q", "k", "v", "o", "gate", "up", "down")
LLAMA = LlamaConfig(
    vocab_size=40,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    lora_rank=4,
    lora_alpha=8.0,
    lora_targets=ALL,
)
GPTJ_CFG = GPTJConfig(
    vocab_size=40,
    d_model=32,
    n_layers=2,
    n_heads=4,
    d_ff=64,
    rotary_dim=4,
    lora_rank=4,
    lora_alpha=8.0,
    lora_targets=ALL,
)


def _params(model, seed=0, nonzero_b=True):
  """Initialised weights; B drawn at random (a fresh B is zero) so the adapters matter."""
  params = nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(seed)))
  if not nonzero_b:
    return params
  base, adapters = lora.split(params)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
  adapters = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.2 * jax.random.normal(next(keys), x.shape)
      if str(path[-1].key).endswith("_lora_b")
      else x,
      adapters,
  )
  return lora.join(base, adapters)


def _forward(model, params, tokens, valid=None):
  valid = jnp.ones(tokens.shape, bool) if valid is None else valid
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  return jax.jit(lambda p, t, pos, v: model.apply({"params": p}, t, pos, v)[0])(
      params, tokens, positions, valid
  )


@pytest.mark.parametrize("cfg", [LLAMA, GPTJ_CFG], ids=["llama", "gptj"])
def test_adapters_sit_beside_every_target_and_fold_into_the_same_function(cfg):
  model = (Llama if isinstance(cfg, LlamaConfig) else GPTJ)(cfg)
  fresh = _params(model, nonzero_b=False)
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(fresh)[0]}
  expected = 2 * 7 * cfg.n_layers if isinstance(cfg, LlamaConfig) else 2 * 6 * cfg.n_layers
  assert sum("_lora_" in n for n in names) == expected  # GPT-J has no gate projection
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 40, (2, 7)), jnp.int32)
  plain = for_decoding(model)
  base, _ = lora.split(fresh)
  np.testing.assert_allclose(  # B = 0: a fresh adapter changes nothing
      _forward(model, fresh, tokens), _forward(plain, base, tokens), atol=1e-6
  )
  params = _params(model)
  adapted = _forward(model, params, tokens)
  assert np.abs(np.asarray(adapted - _forward(plain, base, tokens))).max() > 1e-2
  np.testing.assert_allclose(
      _forward(plain, lora.folded(params, cfg), tokens), adapted, atol=2e-5, rtol=1e-5
  )


def test_a_lora_layers_gradient_is_the_hand_computed_one():
  """y = x·W + s·(x·A)·B on a heads-shaped weight: dL/dA = s·xᵀ·(g·Bᵀ), dL/dB = s·(x·A)ᵀ·g."""
  cfg = dataclasses.replace(LLAMA, lora_targets=("q",))

  class Projection(nn.Module):

    @nn.compact
    def __call__(self, x):
      w = layers.param(
          self,
          "wq",
          (32, 4, 8),
          ("embed", "heads", "head_dim"),
          jnp.float32,
          nn.initializers.normal(1.0),
      )
      return layers.projection(self, "wq", "q", x, w, 1, ("embed", "heads", "head_dim"), cfg)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 32)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(5, 4, 8)), jnp.float32)
  params = nn.meta.unbox(Projection().init(jax.random.PRNGKey(0), x))["params"]
  params["wq_lora_b"] = jnp.asarray(rng.normal(size=(4, 4, 8)), jnp.float32)
  grads = jax.grad(lambda p: jnp.sum(Projection().apply({"params": p}, x) * g))(params)
  s, a = 8.0 / 4, np.asarray(params["wq_lora_a"], np.float64)
  b, xn, gn = (np.asarray(v, np.float64) for v in (params["wq_lora_b"], x, g))
  b2, g2 = b.reshape(4, 32), gn.reshape(5, 32)
  np.testing.assert_allclose(grads["wq_lora_a"], s * xn.T @ (g2 @ b2.T), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      grads["wq_lora_b"], (s * (xn @ a).T @ g2).reshape(4, 4, 8), rtol=1e-5, atol=1e-5
  )


def test_a_step_trains_the_adapters_alone():
  """On the layer scan, with remat, over a (2, 2, 2) mesh."""
  model = Llama(dataclasses.replace(LLAMA, scan_layers=True, remat="full"))
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2, 8))
  trainer = Trainer(model, _train_cfg(), mesh)
  params = trainer.init_params(1)
  base_before = jax.tree.map(np.asarray, lora.split(params)[0])
  adapters_before = jax.tree.map(np.asarray, lora.split(params)[1])
  state = trainer.new_state(params)
  opt_leaves = jax.tree.leaves(state.opt_state)
  adapter_leaves = jax.tree.leaves(adapters_before)
  # AdamW's two moments for each adapter and nothing for the base (plus scalar counts)
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * sum(x.size for x in adapter_leaves)
  step_fn = trainer.step_fn()
  lm, reflection = trainer.put_batch(_batch(np.random.default_rng(1)))
  for _ in range(2):
    state, metrics = step_fn(state, lm, reflection)
  assert np.isfinite(float(metrics["loss"]))
  base_after, adapters_after = lora.split(state.params)
  for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
    assert np.asarray(after).tobytes() == before.tobytes()  # frozen to the byte
  changed = [
      not np.array_equal(np.asarray(after), before)
      for before, after in zip(adapter_leaves, jax.tree.leaves(adapters_after))
  ]
  assert all(changed)


def test_merged_and_unmerged_weights_decode_the_same_greedy_tokens():
  model = Llama(LLAMA)
  params = _params(model, seed=3)
  prompt = np.array([[5, 9, 3, 7, 11], [0, 0, 4, 8, 2]], np.int32)
  valid = prompt > 0
  decoder = decode.Decoder(model, decode.StopTables.never_stop(LLAMA.vocab_size))
  out, _ = decoder(
      lora.folded(params, LLAMA),
      jnp.asarray(prompt),
      jnp.asarray(valid),
      jax.random.PRNGKey(0),
      max_new_tokens=6,
      num_samples=1,
      sampling=sampling.SamplingConfig(),
  )
  # unmerged: the LoRA model itself, the whole (causal) sequence re-run for each greedy token
  tokens = np.concatenate([prompt, np.zeros((2, 6), np.int32)], 1)
  mask = np.concatenate([valid, np.zeros((2, 6), bool)], 1)
  for t in range(5, 11):
    logits = _forward(model, params, jnp.asarray(tokens), jnp.asarray(mask))
    tokens[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
    mask[:, t] = True
  assert np.asarray(out).tolist() == tokens[:, 5:].tolist()


def test_lora_fields_are_validated():
  cfg = config_lib.base_config()
  cfg.model.lora_targets = "q,wq"
  with pytest.raises(config_lib.ConfigError, match="model.lora_targets"):
    config_lib.validate(cfg)
  cfg = config_lib.base_config()
  cfg.model.lora_rank = -1
  with pytest.raises(config_lib.ConfigError, match="model.lora_rank"):
    config_lib.validate(cfg)


def test_lora_learns_a_fixed_batch():
  losses = fixed_batch_losses(Llama(LLAMA))
  assert losses[-1] < 0.8 * losses[0], losses


def test_a_lora_run_trains_adapters_and_decodes_merged(tmp_path):
  """A tiny one-round run with LoRA: the base in the round's checkpoint is the initial one, the
  adapters trained, the evaluation decoded with merged weights; export folds them in."""
  from tailored_jax import checkpointing, rounds
  from tailored_jax.runtime import StudentRuntime
  from tests.test_rounds import tiny_config

  cfg = tiny_config()
  cfg.model.lora_rank = 8
  cfg.model.lora_alpha = 16.0
  cfg.rounds = 1
  workdir = str(tmp_path / "run")
  records = rounds.run(cfg, workdir)
  assert [r["round"] for r in records] == [1] and records[0]["test_accuracy"] is not None
  from tests.test_metrics import read_events

  loss = read_events(f"{workdir}/tensorboard")["train/loss"]  # logged every few steps
  assert len(loss) >= 2 and loss[max(loss)] < loss[min(loss)]  # the LoRA round learns
  run = rounds.Run(cfg, workdir)
  runtime = StudentRuntime(cfg, run.layout, run.mesh, None)
  initial, trained = runtime.params(0), runtime.params(1)
  for a, b in zip(jax.tree.leaves(lora.split(initial)[0]), jax.tree.leaves(lora.split(trained)[0])):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert any(
      not np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(
          jax.tree.leaves(lora.split(initial)[1]), jax.tree.leaves(lora.split(trained)[1])
      )
  )
  manifest = checkpointing.MANIFEST
  assert "_lora_b" in open(f"{workdir}/checkpoints/round_1/0/{manifest}").read()
  run.close()

  from safetensors.numpy import load_file

  from tailored_jax import export

  checkpoint = f"{workdir}/checkpoints/round_1"
  with pytest.raises(ValueError, match="trained from scratch"):
    export.export_peft(checkpoint, str(tmp_path / "adapter"))
  export.export(checkpoint, str(tmp_path / "merged"))  # the adapters folded in
  exported = load_file(str(tmp_path / "merged" / "model.safetensors"))
  layer = jax.tree.map(np.asarray, trained["layer_0"]["attn"])
  merged_wq = layer["wq"] + 2.0 * np.einsum("dr,rnh->dnh", layer["wq_lora_a"], layer["wq_lora_b"])
  np.testing.assert_allclose(
      exported["model.layers.0.self_attn.q_proj.weight"],
      merged_wq.reshape(merged_wq.shape[0], -1).T,
      rtol=1e-6,
      atol=1e-6,
  )


def test_adapter_dropout_acts_in_training_steps_alone():
  """lora_dropout: a step's update differs from the undropped one, the same on every run; a
  forward without a 'dropout' rng (evaluation, decoding) is the undropped model."""
  mesh = sharding.make_mesh(_mesh_cfg(1, 1, 1, 1))
  batch = _batch(np.random.default_rng(1))[0]

  def steps(dropout, times):
    trainer = Trainer(Llama(dataclasses.replace(LLAMA, lora_dropout=dropout)), _train_cfg(), mesh)
    out = []
    for _ in range(times):  # each from the same weights
      state = trainer.new_state(_params(Llama(LLAMA)))
      state, metrics = trainer.step_fn()(state, trainer.put_batch(batch), None)
      adapters = [np.asarray(x) for x in jax.tree.leaves(lora.split(state.params)[1])]
      out.append((float(metrics["loss"]), float(metrics["grad_norm"]), adapters))
    return out

  (plain,), (dropped, again) = steps(0.0, 1), steps(0.5, 2)
  assert plain[0] != dropped[0] and plain[1] != dropped[1]
  assert dropped[:2] == again[:2]
  assert all(np.array_equal(a, b) for a, b in zip(dropped[2], again[2]))
  tokens = jnp.asarray(batch.inputs)
  params = _params(Llama(LLAMA))
  np.testing.assert_array_equal(
      _forward(Llama(dataclasses.replace(LLAMA, lora_dropout=0.5)), params, tokens),
      _forward(Llama(LLAMA), params, tokens),
  )
