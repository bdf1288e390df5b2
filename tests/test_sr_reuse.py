"""`train.sr_reuse_lm_forward`: the triplet loss's anchor and prefix taken from the LM forward.
Its value equals METHOD §3's separate passes; its gradient is the LM forward's anchor (prefix
included) with the positive and negative after a stop-gradient prefix."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailored_jax import config_lib, sharding
from tailored_jax.data.batching import LMBatch, ReflectionBatch
from tailored_jax.models import layers
from tailored_jax.models.llama import Llama
from tailored_jax.train import losses, memory
from tailored_jax.train import step as step_lib
from tailored_jax.train.trainer import Trainer
from tests.test_batching import make_batcher
from tests.test_model_and_decode import CFG, _mesh_cfg, _train_cfg

PREFIX_LENS, ANCHOR_LENS = (5, 9, 7, 9), (6, 4, 8, 3)
SR_MASK = np.array([1, 1, 0, 1], np.float32)


def _consistent_batch(rng, lm_len=20, p=9, c=8):
  """LM rows prefix ⊕ anchor (the last token read too, as the batcher does when reusing), and
  reflection rows with the same prefixes (left-padded) and anchors, random positives/negatives."""
  b = len(PREFIX_LENS)
  tok = lambda n: rng.integers(3, CFG.vocab_size, n).astype(np.int32)
  inputs, input_mask = np.zeros((b, lm_len), np.int32), np.zeros((b, lm_len), bool)
  targets, target_mask = np.zeros((b, lm_len), np.int32), np.zeros((b, lm_len), bool)
  prefix, prefix_mask = np.zeros((b, p), np.int32), np.zeros((b, p), bool)
  conts, cont_mask = np.zeros((b, 3, c), np.int32), np.zeros((b, 3, c), bool)
  for row, (n_p, n_a) in enumerate(zip(PREFIX_LENS, ANCHOR_LENS)):
    pre, anchor = tok(n_p), tok(n_a)
    full = np.concatenate([pre, anchor])
    inputs[row, : len(full)], input_mask[row, : len(full)] = full, True
    targets[row, : len(full) - 1], target_mask[row, : len(full) - 1] = full[1:], True
    prefix[row, p - n_p :], prefix_mask[row, p - n_p :] = pre, True
    for k, ids in enumerate((anchor, tok(rng.integers(2, c + 1)), tok(rng.integers(2, c + 1)))):
      conts[row, k, : len(ids)], cont_mask[row, k, : len(ids)] = ids, True
  lm = LMBatch(
      inputs, targets, input_mask, target_mask, np.where(target_mask, 1.0, 0.0).astype(np.float32)
  )
  return lm, ReflectionBatch(prefix, prefix_mask, conts, cont_mask, SR_MASK)


def _sr_loss_from_lm(model, params, lm, reflection):
  keep = min(reflection.prefix.shape[1], lm.inputs.shape[1])
  _, hidden, kept = step_lib.lm_forward_loss(model, params, lm, keep_kv=keep)
  return step_lib.self_reflection_loss_from_lm(model, params, reflection, lm, hidden, kept, 1.0)


@pytest.fixture(scope="module")
def setup():
  params = nn.meta.unbox(layers.init_boxed_params(Llama(CFG), jax.random.PRNGKey(1)))
  return params, jax.tree.map(jnp.asarray, _consistent_batch(np.random.default_rng(0)))


@pytest.mark.parametrize("scan", [False, True])
def test_reused_loss_equals_the_separate_passes(setup, scan):
  params, (lm, reflection) = setup
  model = Llama(dataclasses.replace(CFG, scan_layers=scan))
  if scan:
    params = layers.stack_layers(jax.tree.map(lambda x: x, params), CFG.n_layers)
  # and with fewer reflection rows than LM rows: gathered by lm_rows (here LM rows 3 and 1)
  pick = lambda x: x[jnp.array([3, 1])]
  subset = ReflectionBatch(
      *(pick(x) for x in dataclasses.astuple(reflection)[:-1]), lm_rows=jnp.array([3, 1], jnp.int32)
  )

  @jax.jit
  def both(p):
    return [
        (_sr_loss_from_lm(model, p, lm, r), step_lib.self_reflection_loss(model, p, r, 1.0))
        for r in (reflection, subset)
    ]

  (reused, separate), (reused_subset, separate_subset) = both(params)
  assert float(separate) > 0.1
  np.testing.assert_allclose(reused, separate, rtol=1e-5)
  np.testing.assert_allclose(reused_subset, separate_subset, rtol=1e-5)


def test_reused_gradient_reaches_the_prefix_only_through_the_anchor(setup):
  """Gradient = that of L_LM + λ·triplet(anchor: the full string's EOS state, with gradient;
  positive/negative: after the separate stop-gradient prefix pass)."""
  params, (lm, reflection) = setup
  model = Llama(CFG)

  def expected(p):
    lm_loss, hidden, _ = step_lib.lm_forward_loss(model, p, lm)
    anchor = losses.last_real_token(hidden, lm.input_mask)
    h = step_lib.continuation_hidden(
        model,
        p,
        step_lib.prefix_context(model, p, reflection),
        reflection.prefix_mask.sum(1),
        reflection.continuations[:, 1:],
        reflection.continuation_mask[:, 1:],
    )
    return lm_loss + 0.5 * losses.triplet_loss(anchor, h[:, 0], h[:, 1], reflection.sr_mask, 1.0)

  def reused(p):
    keep = reflection.prefix.shape[1]
    lm_loss, hidden, kept = step_lib.lm_forward_loss(model, p, lm, keep_kv=keep)
    return lm_loss + 0.5 * step_lib.self_reflection_loss_from_lm(
        model, p, reflection, lm, hidden, kept, 1.0
    )

  separate = lambda p: (
      step_lib.lm_forward_loss(model, p, lm)[0]
      + 0.5 * step_lib.self_reflection_loss(model, p, reflection, 1.0)
  )
  want, got, method = jax.jit(lambda p: [jax.grad(f)(p) for f in (expected, reused, separate)])(
      params
  )
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-6)
  # and it is a different gradient from METHOD §3's (the anchor's prefix path)
  diff = max(
      float(jnp.max(jnp.abs(g - m))) for g, m in zip(jax.tree.leaves(got), jax.tree.leaves(method))
  )
  assert diff > 1e-4


def test_trainer_step_reusing_the_lm_forward_equals_the_separate_passes_in_value():
  """Real batcher arrays, both ways: same LM and triplet losses; the reusing batch reads EOS,
  leaves the anchor slot empty and puts reflection row r on LM row r. The reusing step runs on a
  (1, 2, 2) mesh: rows and kept keys/values split over fsdp, heads over tensor."""
  meshes = {False: _mesh_cfg(1, 1, 1, 1), True: _mesh_cfg(1, 2, 2, 4)}
  tok, separate_batcher = make_batcher()
  _, reuse_batcher = make_batcher(sr_reuse_lm_forward=True)
  cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size)
  metrics = {}
  for reuse, batcher in ((False, separate_batcher), (True, reuse_batcher)):
    train_cfg = _train_cfg()
    train_cfg.sr_reuse_lm_forward = reuse
    trainer = Trainer(Llama(cfg), train_cfg, sharding.make_mesh(meshes[reuse]))
    lm, reflection = batcher.build([2, 1, 0], seed=0)
    if reuse:
      assert not reflection.continuation_mask[:, 0].any()
      assert reflection.sr_mask.tolist() == [0.0, 1.0, 1.0, 0.0]
      assert reflection.lm_rows is None  # reflection row r is LM row r
      n = lm.input_mask.sum(1)
      assert (lm.inputs[np.arange(4), n - 1][:3] == tok.eos_id).all()
    state = trainer.new_state(trainer.init_params(0))
    _, metrics[reuse] = trainer.step_fn()(
        state, trainer.put_batch(lm), trainer.put_batch(reflection)
    )
  assert float(metrics[False]["sr_loss"]) > 0.1
  for key in ("lm_loss", "sr_loss", "sr_examples"):
    np.testing.assert_allclose(metrics[True][key], metrics[False][key], rtol=1e-5)


def test_planner_counts_two_continuations_when_reusing():
  t = config_lib.base_config().train
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  separate = memory.worst_case_shape(t, mesh)
  t.sr_reuse_lm_forward = True
  reusing = memory.worst_case_shape(t, mesh)
  assert (separate.continuations, reusing.continuations) == (3, 2)
  kept = lambda shape: memory.train_memory(CFG, shape, 0, 0, "full").activations
  lm_only = kept(dataclasses.replace(separate, sr_rows=0))
  assert kept(separate) - lm_only == 1.5 * (kept(reusing) - lm_only) > 0


def test_planner_counts_the_native_attentions_buffers():
  """With the native CPU kernel a continuation token keeps one attention output and
  log-sum-exp (one softmax over prefix and own keys, not two merged parts) and XLA holds no
  score buffers."""
  t = config_lib.base_config().train
  shape = memory.worst_case_shape(t, {"data": 1, "fsdp": 1, "tensor": 1})
  plan = lambda native: memory.train_memory(
      CFG, dataclasses.replace(shape, native_attention=native), 0, 0, "save_attention"
  )
  xla, native = plan(False), plan(True)
  cont_tokens = shape.continuations * shape.sr_rows * shape.continuation_len
  per_part = CFG.n_heads * CFG.head_dim * 4 + CFG.n_heads * 4  # output and lse, float32
  assert xla.activations - native.activations == CFG.n_layers * cont_tokens * per_part
  scores = memory.attention_scores(CFG, shape.batch, 1, shape.seq_len, shape.seq_len, 1)
  assert xla.layer_working - native.layer_working > scores > 0
