import math

import jax.numpy as jnp
import numpy as np
import pytest

from tailored_jax.train import losses


def test_lm_loss_hand_computed():
  logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
  targets = np.array([[0, 1, 2]])
  weights = np.array([[0.1, 1.0, 0.0]])
  mask = np.array([[True, True, False]])
  expected = (0.1 * -math.log(0.5) + 1.0 * -math.log(0.8)) / 2
  assert abs(float(losses.lm_loss(logits, targets, weights, mask)) - expected) < 1e-6


def test_triplet_loss_hand_computed():
  a = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  p = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  n = np.array([[0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]])
  mask = np.array([1.0, 1.0, 0.0])
  # row 0: 1 - cos45 + 0 ; row 1: max(0, 1 - 1 - 1) = 0 ; row 2 masked
  expected = (1 - 1 / math.sqrt(2)) / 2
  got = float(losses.triplet_loss(a, p, n, mask, 1.0))
  assert abs(got - expected) < 1e-6
  assert float(losses.triplet_loss(a, p, n, np.zeros(3), 1.0)) == 0.0


def test_last_real_token():
  h = np.arange(2 * 4 * 1, dtype=np.float32).reshape(2, 4, 1)
  valid = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  assert losses.last_real_token(h, valid)[:, 0].tolist() == [1.0, 7.0]


def test_dpo_loss_by_hand():
  got = losses.dpo_loss(
      jnp.array([-1.0, -5.0]),
      jnp.array([-3.0, -1.0]),
      jnp.array([-2.0, -2.0]),
      jnp.array([-2.0, -2.0]),
      jnp.array([1.0, 0.0]),
      beta=0.5,
  )
  # margin = 0.5 * ((-1 + 2) - (-3 + 2)) = 1; the second row is masked out
  assert float(got) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_sequence_logprob_by_hand():
  first = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  rest = jnp.log(jnp.array([[[0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]]))
  tokens = jnp.array([[0, 1, 2]])
  # p(0) from `first`, p(1) from position 0, p(2) from position 1; position 2 predicts nothing
  expected = math.log(0.5) + math.log(0.8) + math.log(0.6)
  got = losses.sequence_logprob(first, rest, tokens, jnp.array([[True, True, True]]))
  assert float(got[0]) == pytest.approx(expected, rel=1e-6)
  short = losses.sequence_logprob(first, rest, tokens, jnp.array([[True, True, False]]))
  assert float(short[0]) == pytest.approx(math.log(0.5) + math.log(0.8), rel=1e-6)
