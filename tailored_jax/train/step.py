"""The pure train step: LM loss on the full string plus λ · self-reflection on shared prefixes."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from tailored_jax.data.batching import LMBatch, ReflectionBatch
from tailored_jax.models import head_logits, lora
from tailored_jax.models.kv_cache import Context, KVCache
from tailored_jax.models.layers import LAYERS
from tailored_jax.train import losses


@flax.struct.dataclass
class Guard:
  """The non-finite guard's record, kept on device (read by the host only at log points)."""

  nonfinite_run: jax.Array  # int32: consecutive steps whose loss or gradient was not finite
  nonfinite_total: jax.Array  # int32: such steps this round
  first_bad_step: jax.Array  # int32: the step where the current run began (-1: none)
  last_finite_loss: jax.Array  # float32

  @classmethod
  def fresh(cls) -> "Guard":
    return cls(
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.full((), -1, jnp.int32),
        jnp.full((), jnp.nan, jnp.float32),
    )


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  guard: Guard


@dataclasses.dataclass(frozen=True)
class LossConfig:
  sr_weight: float  # λ
  sr_margin: float  # ρ
  skip_nonfinite: bool = True  # a step whose loss or gradient is not finite changes nothing
  loss_chunk_tokens: int = 0  # > 0: LM-head logits made this many positions at a time
  reflection_loss: str = "triplet"  # or 'dpo': learning from the same (correct, wrong) pairs
  dpo_beta: float = 0.1
  sr_reuse_lm_forward: bool = False  # the triplet's anchor and prefix from the LM forward
  microbatches: int = 1  # gradients accumulated over this many slices of the batch's rows


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW with linear warm-up then constant lr; no decay on 1-D params (norm scales; a scanned
  model's stacked ones too)."""
  schedule = optax.join_schedules(
      [
          optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)),
          optax.constant_schedule(cfg.lr),
      ],
      [max(cfg.warmup_steps, 1)],
  )
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim - (path[0].key == LAYERS) > 1, params
  )
  chain = []
  if cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip))
  chain.append(
      optax.adamw(
          schedule,
          b1=cfg.b1,
          b2=cfg.b2,
          eps=cfg.eps,
          weight_decay=cfg.weight_decay,
          mask=decay_mask,
      )
  )
  return optax.chain(*chain)


def lm_forward_loss(model, params, lm: LMBatch, chunk: int = 0, keep_kv: int = 0):
  """(L_LM, final hidden states, the first `keep_kv` tokens' keys and values or None)."""
  tokens_bt = lm.inputs
  positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
  if chunk:
    _, hidden_btd, kept = model.apply(
        {"params": params},
        tokens_bt,
        positions_bt,
        lm.input_mask,
        with_logits=False,
        keep_kv=keep_kv,
    )
    loss = losses.chunked_lm_loss(
        hidden_btd,
        lambda h: head_logits(params, h, model.cfg),
        lm.targets,
        lm.target_weights,
        lm.target_mask,
        chunk,
    )
    return loss, hidden_btd, kept
  logits_btv, hidden_btd, kept = model.apply(
      {"params": params}, tokens_bt, positions_bt, lm.input_mask, keep_kv=keep_kv
  )
  return losses.lm_loss(logits_btv, lm.targets, lm.target_weights, lm.target_mask), hidden_btd, kept


def prefix_lengths(reflection: ReflectionBatch) -> jax.Array:
  return jnp.sum(reflection.prefix_mask.astype(jnp.int32), axis=1)


def encode_prefix(model, params, reflection: ReflectionBatch) -> tuple[jax.Array, Context]:
  """The reflection rows' left-padded prefixes encoded once: their final hidden states
  [rows, p, d] and their keys and values as a context (one group per row)."""
  prefix_bp, prefix_valid_bp = reflection.prefix, reflection.prefix_mask
  b, p = prefix_bp.shape
  cfg = model.cfg
  prefix_positions_bp = jnp.maximum(jnp.cumsum(prefix_valid_bp, axis=1) - 1, 0)
  prefix_cache = KVCache.zeros(
      cfg.n_layers,
      b,
      p,
      cfg.n_kv_heads,
      cfg.head_dim,
      jnp.dtype(cfg.dtype),
      stacked=cfg.scan_layers,
  )
  _, hidden_bpd, prefix_cache = model.apply(
      {"params": params},
      prefix_bp,
      prefix_positions_bp,
      prefix_valid_bp,
      prefix_cache,
      with_logits=False,
  )
  return hidden_bpd, prefix_cache.as_context(prefix_positions_bp)


def prefix_context(model, params, reflection: ReflectionBatch) -> Context:
  """The prefixes' keys and values (`encode_prefix`) without gradient."""
  return jax.lax.stop_gradient(encode_prefix(model, params, reflection)[1])


def run_continuations(
    model, params, context: Context, prefix_len_b, cont_bmc, valid_bmc, with_logits: bool = False
):
  """(logits [rows·m, c, vocab] or None, final hidden states [rows·m, c, d]) of each row's m
  continuations, run after its prefix's keys and values (a context read by the m, not copied;
  the training attention over it and their own tokens, no cache)."""
  b, m, c = cont_bmc.shape
  positions_bmc = jnp.broadcast_to(prefix_len_b[:, None, None] + jnp.arange(c), (b, m, c))
  logits_rcv, hidden_rcd, _ = model.apply(
      {"params": params},
      cont_bmc.reshape(b * m, c),
      positions_bmc.reshape(b * m, c),
      valid_bmc.reshape(b * m, c),
      context,
      with_logits=with_logits,
  )
  return logits_rcv, hidden_rcd


def continuation_hidden(model, params, context: Context, prefix_len_b, cont_bmc, valid_bmc):
  """[rows, m, d]: the final hidden state at the last real token of each of a row's m
  continuations (`run_continuations`)."""
  b, m, c = cont_bmc.shape
  _, hidden_rcd = run_continuations(model, params, context, prefix_len_b, cont_bmc, valid_bmc)
  return losses.last_real_token(hidden_rcd, valid_bmc.reshape(b * m, c)).reshape(b, m, -1)


def self_reflection_loss(model, params, reflection: ReflectionBatch, margin: float):
  """METHOD §3: the prefix encoded once without gradient; anchor, positive and negative
  continue from its keys and values."""
  h_bmd = continuation_hidden(
      model,
      params,
      prefix_context(model, params, reflection),
      prefix_lengths(reflection),
      reflection.continuations,
      reflection.continuation_mask,
  )
  return losses.triplet_loss(h_bmd[:, 0], h_bmd[:, 1], h_bmd[:, 2], reflection.sr_mask, margin)


def self_reflection_loss_from_lm(
    model,
    params,
    reflection: ReflectionBatch,
    lm: LMBatch,
    hidden_btd,
    kept: KVCache,
    margin: float,
):
  """The triplet loss reusing the LM forward (`train.sr_reuse_lm_forward`): the anchor is its LM
  row's final hidden state at EOS (the same string, so the same value as METHOD §3's anchor when
  it fits the continuation cap, but its gradient also reaches the prefix), and the positive and
  negative continue from the LM forward's prefix keys and values under stop-gradient, exactly as
  in METHOD §3. Only they run again: no prefix pass, no anchor pass."""
  if reflection.lm_rows is None:  # row r is LM row r: nothing to gather
    rows = lambda x, axis=0: x
  else:
    rows = lambda x, axis=0: jnp.take(x, reflection.lm_rows, axis=axis)
  layer_rows = (
      (lambda x: rows(x, axis=1))
      if model.cfg.scan_layers
      else (lambda xs: tuple(rows(x) for x in xs))
  )
  prefix_len_b = prefix_lengths(reflection)
  slots = jnp.arange(kept.slots)
  context = jax.lax.stop_gradient(
      Context(
          layer_rows(kept.keys),
          layer_rows(kept.values),
          jnp.where(slots[None, :] < prefix_len_b[:, None], slots[None, :], -1),
      )
  )
  h_bmd = continuation_hidden(
      model,
      params,
      context,
      prefix_len_b,
      reflection.continuations[:, 1:],
      reflection.continuation_mask[:, 1:],
  )
  anchor_bd = losses.last_real_token(rows(hidden_btd), rows(lm.input_mask))
  return losses.triplet_loss(anchor_bd, h_bmd[:, 0], h_bmd[:, 1], reflection.sr_mask, margin)


def continuation_logprobs(model, params, reflection: ReflectionBatch, which: tuple[int, ...]):
  """[rows, len(which)]: log p(continuation | prefix) of the continuations `which` (0 anchor,
  1 positive, 2 negative); the prefix runs once and its keys and values are shared."""
  cont_bmc = reflection.continuations[:, list(which)]
  valid_bmc = reflection.continuation_mask[:, list(which)]
  b, m, c = cont_bmc.shape
  hidden_bpd, context = encode_prefix(model, params, reflection)
  first_logits_bv = head_logits(params, hidden_bpd[:, -1:], model.cfg)[:, 0]  # left-padded
  logits_rcv, _ = run_continuations(
      model, params, context, prefix_lengths(reflection), cont_bmc, valid_bmc, with_logits=True
  )
  return losses.sequence_logprob(
      jnp.repeat(first_logits_bv, m, axis=0),
      logits_rcv,
      cont_bmc.reshape(b * m, c),
      valid_bmc.reshape(b * m, c),
  ).reshape(b, m)


def dpo_reflection_loss(model, params, reference_params, reflection: ReflectionBatch, beta: float):
  """DPO on (anchor: a correct rationale, negative: the student's own wrong one), against the
  round's starting weights as the reference model."""
  policy_bm = continuation_logprobs(model, params, reflection, (0, 2))
  reference_model = getattr(model, "deterministic", model)  # no dropout in the reference
  reference_bm = jax.lax.stop_gradient(
      continuation_logprobs(reference_model, reference_params, reflection, (0, 2))
  )
  return losses.dpo_loss(
      policy_bm[:, 0],
      policy_bm[:, 1],
      reference_bm[:, 0],
      reference_bm[:, 1],
      reflection.sr_mask,
      beta,
  )


@dataclasses.dataclass
class _Dropping:
  """The model with a 'dropout' rng of its own for each application in one train step (LoRA
  dropout: a key per step, folded with the application's order while tracing);
  `deterministic` is the model itself (DPO's reference pass uses it)."""

  deterministic: Any
  key: jax.Array
  applied: int = 0

  @property
  def cfg(self):
    return self.deterministic.cfg

  def apply(self, variables, *args, **kwargs):
    self.applied += 1
    rngs = {"dropout": jax.random.fold_in(self.key, self.applied)}
    return self.deterministic.apply(variables, *args, rngs=rngs, **kwargs)


def trainable(params):
  """(what the step trains, a function putting it back into the whole parameter tree): with
  LoRA adapters only the adapters (the base is frozen: no gradient, no optimizer state), else
  every parameter."""
  if not lora.has_adapters(params):
    return params, lambda t: t
  base, adapters = lora.split(params)
  return adapters, lambda t: lora.join(base, t)


def microbatch_rows(tree, microbatches: int):
  """Each [rows, ...] leaf as [microbatches, rows / microbatches, ...], microbatch j holding
  rows j, j + microbatches, ...: a device's contiguous share of the rows then has its part of
  every microbatch, so slicing moves no rows between devices."""
  split = lambda x: jnp.swapaxes(
      x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1
  )
  return jax.tree.map(split, tree)


def accumulated_gradients(losses_of, params, lm, reflection, sr_weight: float, microbatches: int):
  """(loss, L_LM, L_SR, gradients) of the whole batch from `microbatches` slices of its rows
  (`lax.scan`; float32 sums): each slice's losses are weighted by its share of the batch's
  target tokens and self-reflection rows, the normalisers of the whole-batch losses, so the
  result equals the single-batch step's."""
  count = lambda x: jnp.sum(x.astype(jnp.float32))
  lm_total = jnp.maximum(count(lm.target_mask), 1.0)
  sr_total = jnp.maximum(count(reflection.sr_mask), 1e-6) if reflection is not None else 1.0
  slices = (microbatch_rows(lm, microbatches), microbatch_rows(reflection, microbatches))

  def one(sums, batch):
    lm_j, reflection_j = batch
    lm_share = count(lm_j.target_mask) / lm_total
    sr_share = count(reflection_j.sr_mask) / sr_total if reflection_j is not None else 0.0

    def loss_fn(params):
      lm_loss, sr_loss = losses_of(params, lm_j, reflection_j)
      lm_part, sr_part = lm_loss * lm_share, sr_loss * sr_share
      return lm_part + sr_weight * sr_part, (lm_part, sr_part)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_sums = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), sums[0], grads)
    return (grad_sums, sums[1] + loss, sums[2] + parts[0], sums[3] + parts[1]), None

  zero = jnp.zeros((), jnp.float32)
  grad_zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (grads, loss, lm_loss, sr_loss), _ = jax.lax.scan(one, (grad_zeros, zero, zero, zero), slices)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return loss, lm_loss, sr_loss, grads


def train_step(
    state: TrainState,
    lm: LMBatch,
    reflection: ReflectionBatch | None,
    reference_params=None,
    *,
    model,
    optimizer,
    loss_cfg: LossConfig,
):
  """One optimizer step on L_LM + λ·L_SR; without reflection rows (None) L_SR is 0. With
  `loss_cfg.reflection_loss='dpo'`, L_SR is DPO against `reference_params`."""
  if model.cfg.lora_rank and model.cfg.lora_dropout > 0:
    model = _Dropping(model, jax.random.fold_in(jax.random.PRNGKey(0), state.step))

  reuse = (
      reflection is not None
      and loss_cfg.reflection_loss == "triplet"
      and loss_cfg.sr_reuse_lm_forward
  )

  def losses_of(params, lm, reflection):
    keep_kv = min(reflection.prefix.shape[1], lm.inputs.shape[1]) if reuse else 0
    lm_loss, hidden_btd, kept = lm_forward_loss(
        model, params, lm, loss_cfg.loss_chunk_tokens, keep_kv
    )
    if reflection is None:
      sr_loss = jnp.zeros((), jnp.float32)
    elif loss_cfg.reflection_loss == "dpo":
      sr_loss = dpo_reflection_loss(model, params, reference_params, reflection, loss_cfg.dpo_beta)
    elif reuse:
      sr_loss = self_reflection_loss_from_lm(
          model, params, reflection, lm, hidden_btd, kept, loss_cfg.sr_margin
      )
    else:
      sr_loss = self_reflection_loss(model, params, reflection, loss_cfg.sr_margin)
    return lm_loss, sr_loss

  trained, whole = trainable(state.params)
  with_trained = lambda t, lm, reflection: losses_of(whole(t), lm, reflection)
  if loss_cfg.microbatches > 1:
    loss, lm_loss, sr_loss, grads = accumulated_gradients(
        with_trained, trained, lm, reflection, loss_cfg.sr_weight, loss_cfg.microbatches
    )
  else:

    def loss_fn(t):
      lm_loss, sr_loss = with_trained(t, lm, reflection)
      return lm_loss + loss_cfg.sr_weight * sr_loss, (lm_loss, sr_loss)

    (loss, (lm_loss, sr_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, trained)
  new_trained = optax.apply_updates(trained, updates)
  if loss_cfg.skip_nonfinite:  # the selects fuse into the update's elementwise pass
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_trained, opt_state = keep(new_trained, trained), keep(opt_state, state.opt_state)
  params = whole(new_trained)
  g = state.guard
  guard = Guard(
      nonfinite_run=jnp.where(finite, 0, g.nonfinite_run + 1),
      nonfinite_total=g.nonfinite_total + (~finite).astype(jnp.int32),
      first_bad_step=jnp.where(
          finite, -1, jnp.where(g.nonfinite_run == 0, state.step, g.first_bad_step)
      ),
      last_finite_loss=jnp.where(finite, loss, g.last_finite_loss),
  )
  metrics = {
      "loss": loss,
      "lm_loss": lm_loss,
      "sr_loss": sr_loss,
      "grad_norm": grad_norm,
      "target_tokens": jnp.sum(lm.target_mask.astype(jnp.int32)),
      "sr_examples": (
          jnp.zeros((), jnp.int32)
          if reflection is None
          else jnp.sum(reflection.sr_mask.astype(jnp.int32))
      ),
  }
  return TrainState(state.step + 1, params, opt_state, guard), metrics


def all_finite(tree) -> jax.Array:
  """Whether every element of every array in `tree` is finite (a scalar bool)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
