"""Gradient accumulation (`train.microbatches`): one update from slices of the rows equals the
whole batch's, self-reflection rows included; the planner picks the count that fits."""

import logging

import jax
import numpy as np
import pytest

from tailored_jax import config_lib, sharding
from tailored_jax.models.llama import Llama
from tailored_jax.train.trainer import Trainer
from tests.test_model_and_decode import CFG, _batch, _mesh_cfg, _train_cfg


def _step(microbatches: int, mesh_shape=(1, 1, 1, 1), reuse: bool = False):
  train_cfg = _train_cfg()
  train_cfg.microbatches = microbatches
  train_cfg.sr_reuse_lm_forward = reuse
  trainer = Trainer(Llama(CFG), train_cfg, sharding.make_mesh(_mesh_cfg(*mesh_shape)))
  state = trainer.new_state(trainer.init_params(0))
  lm, reflection = (trainer.put_batch(x) for x in _batch(np.random.default_rng(3)))
  lowered = trainer.step_fn().lower(state, lm, reflection).as_text()
  assert ("stablehlo.while" in lowered) == (microbatches > 1)  # the slices' scan
  state, metrics = trainer.step_fn()(state, lm, reflection)
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize(
    "microbatches, mesh_shape, reuse",
    [(4, (1, 2, 1, 2), False), (2, (1, 1, 1, 1), True)],
)
def test_one_update_from_microbatches_equals_the_whole_batch(microbatches, mesh_shape, reuse):
  """8 rows with padding, filler reflection rows (sr_mask 0) and uneven target counts per
  slice: losses, gradient norm and the updated weights agree to 1e-6 (float32)."""
  want_params, want = _step(1, mesh_shape, reuse)
  got_params, got = _step(microbatches, mesh_shape, reuse)
  for name in ("loss", "lm_loss", "sr_loss", "grad_norm"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
  assert got["target_tokens"] == want["target_tokens"]
  assert float(want["sr_loss"]) > 0
  for w, g in zip(jax.tree.leaves(want_params), jax.tree.leaves(got_params)):
    np.testing.assert_allclose(g, w, atol=1e-6)


def test_the_planner_picks_the_fewest_microbatches_that_fit(caplog):
  train_cfg = _train_cfg()
  train_cfg.update(
      microbatches=0,
      batch_size=8,
      max_seq_len=64,
      max_continuation_len=16,
      sr_batch_size=0,
      sr_reuse_lm_forward=False,
  )
  trainer = Trainer(Llama(CFG), train_cfg, sharding.make_mesh(_mesh_cfg(1, 1, 1, 1)))
  plans = {k: trainer.planner.with_microbatches(k).plan() for k in (1, 2, 4)}
  assert plans[4].activations < plans[2].activations < plans[1].activations
  assert plans[2].gradients == 2 * plans[1].gradients  # float32 sums beside a slice's
  budget_gb = (plans[2].total + plans[1].total) / 2 / 1e9  # 2 slices fit, the whole batch not
  with caplog.at_level(logging.INFO):
    trainer.fit_memory(budget_gb, lambda: 0)
  assert trainer.microbatches == 2 and trainer.planner.shape.microbatches == 2
  assert "train.microbatches=0: 2 microbatches of 4 rows fit" in caplog.text
  whole = train_cfg.copy_and_resolve_references()
  whole.microbatches = 1
  with pytest.raises(config_lib.ConfigError, match=r"microbatches=0 slices the batch until it"):
    Trainer(Llama(CFG), whole, trainer.mesh).fit_memory(budget_gb, lambda: 0)


def test_microbatches_that_do_not_divide_the_rows_are_refused_by_field():
  cfg = config_lib.base_config()
  cfg.train.update(batch_size=16, microbatches=3)
  with pytest.raises(config_lib.ConfigError, match=r"train.microbatches: must divide"):
    config_lib.validate(cfg)
  cfg.train.update(microbatches=2, sr_batch_size=4, sr_reuse_lm_forward=True)
  with pytest.raises(config_lib.ConfigError, match=r"sr_reuse_lm_forward"):
    config_lib.validate(cfg)
