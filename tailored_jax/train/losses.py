"""The two losses of METHOD §3 as pure functions of arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lm_loss(logits_btv, targets_bt, weights_bt, target_mask_bt):
  """Σ w·CE / (number of real target tokens): w = 0.1 on prefix targets, 1 on the continuation."""
  ce_bt = optax.softmax_cross_entropy_with_integer_labels(
      logits_btv.astype(jnp.float32), targets_bt
  )
  total = jnp.sum(ce_bt * weights_bt)
  count = jnp.sum(target_mask_bt.astype(jnp.float32))
  return total / jnp.maximum(count, 1.0)


def chunked_lm_loss(hidden_btd, head_fn, targets_bt, weights_bt, target_mask_bt, chunk: int):
  """`lm_loss` with the logits made `chunk` positions at a time and remade in the backward
  pass, so [batch, seq, vocab] logits (1 GB at 8 × 656 × 49k in float32) never exist at once."""
  b, t, d = hidden_btd.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  pad_bt = lambda x: jnp.pad(x, ((0, 0), (0, pad)))
  h_nbcd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  y_nbc = pad_bt(targets_bt).reshape(b, n, chunk).swapaxes(0, 1)
  w_nbc = pad_bt(weights_bt).reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_total(h_bcd, y_bc, w_bc):
    ce_bc = optax.softmax_cross_entropy_with_integer_labels(head_fn(h_bcd), y_bc)
    return jnp.sum(ce_bc * w_bc)

  total, _ = jax.lax.scan(
      lambda acc, xs: (acc + chunk_total(*xs), None),
      jnp.zeros((), jnp.float32),
      (h_nbcd, y_nbc, w_nbc),
  )
  count = jnp.sum(target_mask_bt.astype(jnp.float32))
  return total / jnp.maximum(count, 1.0)


def cosine(x_bd, y_bd, eps: float = 1e-8):
  x_bd, y_bd = x_bd.astype(jnp.float32), y_bd.astype(jnp.float32)
  dot = jnp.sum(x_bd * y_bd, axis=-1)
  norms = jnp.linalg.norm(x_bd, axis=-1) * jnp.linalg.norm(y_bd, axis=-1)
  return dot / jnp.maximum(norms, eps)


def triplet_loss(anchor_bd, positive_bd, negative_bd, mask_b, margin: float):
  """Σ m·max(0, ρ − cos(a, p) + cos(a, n)) / max(Σ m, 1e-6)."""
  per_example_b = jax.nn.relu(
      margin - cosine(anchor_bd, positive_bd) + cosine(anchor_bd, negative_bd)
  )
  mask_b = mask_b.astype(jnp.float32)
  return jnp.sum(per_example_b * mask_b) / jnp.maximum(jnp.sum(mask_b), 1e-6)


def last_real_token(hidden_btd, valid_bt):
  """hidden state at each row's last valid position (rows are right-padded)."""
  last_b = jnp.maximum(jnp.sum(valid_bt.astype(jnp.int32), axis=1) - 1, 0)
  return jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)[:, 0, :]


def dpo_loss(
    policy_chosen_b,
    policy_rejected_b,
    reference_chosen_b,
    reference_rejected_b,
    mask_b,
    beta: float,
):
  """Σ m·−log σ(β·((π_w − ref_w) − (π_l − ref_l))) / max(Σ m, 1e-6): DPO on sequence
  log-probabilities of a chosen (correct) and a rejected (the student's wrong) rationale."""
  margin_b = beta * (
      (policy_chosen_b - reference_chosen_b) - (policy_rejected_b - reference_rejected_b)
  )
  mask_b = mask_b.astype(jnp.float32)
  return jnp.sum(-jax.nn.log_sigmoid(margin_b) * mask_b) / jnp.maximum(jnp.sum(mask_b), 1e-6)


def sequence_logprob(first_logits_bv, logits_bcv, tokens_bc, valid_bc):
  """Σ log p(token) over each row's valid tokens: the first predicted by `first_logits_bv` (the
  prefix's last position), token j+1 by position j of `logits_bcv`."""
  first_b = jnp.take_along_axis(
      jax.nn.log_softmax(first_logits_bv.astype(jnp.float32), axis=-1), tokens_bc[:, :1], axis=1
  )[:, 0]
  rest_bc = jnp.take_along_axis(
      jax.nn.log_softmax(logits_bcv[:, :-1].astype(jnp.float32), axis=-1),
      tokens_bc[:, 1:, None],
      axis=2,
  )[..., 0]
  return first_b * valid_bc[:, 0].astype(jnp.float32) + jnp.sum(
      rest_bc * valid_bc[:, 1:].astype(jnp.float32), axis=1
  )
