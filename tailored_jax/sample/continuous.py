"""Continuous batching on the device: a fixed set of decode slots, each row at its own step.

A row that stops frees its slot; `insert` prefills the next prompts (a few bucketed shapes) into
free slots while `advance` keeps the others decoding, until enough slots are free to refill.
Each slot keeps its prompt's keys and values in its own context row (right-aligned, so the same
tokens sit in the same slot order as in a static batch) and its generated tokens in its own
buffer from slot 0, so a row computes what it would in a static batch: same greedy tokens, and
the same draws, keyed by (prompt, sample) and the row's own step.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from tailored_jax.models.kv_cache import Context, KVCache, buffer_zeros, cache_dtype
from tailored_jax.sample.prefill import prefill_prompts
from tailored_jax.sample.sampling import NEG_INF, SamplingConfig, choose_tokens
from tailored_jax.sample.stops import StopTables, stop_tokens


@flax.struct.dataclass
class Slots:
  """The decode slots' state. `cache.index` is each live slot's step (tokens generated so far, its
  next own-buffer slot; 0 once stopped, and its prompt's positions -1, so that a step's reads
  span the live rows alone); `cache.context[-1]` its prompt; `live_s` whether it holds a row
  still generating; `tokens_sm` what it generated (pad after a stop), `lengths_s` how many."""

  cache: KVCache
  logits_sv: jax.Array
  tokens_sm: jax.Array
  keys_s: jax.Array  # [slots, 2]: the row's sampling key (step t draws with fold_in(key, t))
  first_position_s: jax.Array  # the position of the row's first generated token
  prev_s: jax.Array
  live_s: jax.Array
  lengths_s: jax.Array

  @property
  def size(self) -> int:
    return self.live_s.shape[0]


def empty_slots(
    prefix: Context | None,
    *,
    model,
    slots: int,
    prompt_slots: int,
    max_new_tokens: int,
    pad_id: int,
) -> Slots:
  """`slots` free slots for prompts of up to `prompt_slots` tokens after the shared `prefix`."""
  cfg = model.cfg
  dtype = cache_dtype(cfg)
  zeros = lambda: tuple(
      buffer_zeros((slots, cfg.n_kv_heads, prompt_slots, cfg.head_dim), dtype)
      for _ in range(cfg.n_layers)
  )
  prompts = Context(zeros(), zeros(), jnp.full((slots, prompt_slots), -1, jnp.int32))
  context = (() if prefix is None else (prefix,)) + (prompts,)
  cache = KVCache.zeros(
      cfg.n_layers, slots, max_new_tokens, cfg.n_kv_heads, cfg.head_dim, dtype, context
  )
  return Slots(
      cache=cache.replace(index=jnp.zeros((slots,), jnp.int32)),
      logits_sv=jnp.zeros((slots, cfg.vocab_size), jnp.float32),
      tokens_sm=jnp.full((slots, max_new_tokens), pad_id, jnp.int32),
      keys_s=jnp.zeros((slots, 2), jnp.uint32),
      first_position_s=jnp.zeros((slots,), jnp.int32),
      prev_s=jnp.full((slots,), pad_id, jnp.int32),
      live_s=jnp.zeros((slots,), bool),
      lengths_s=jnp.zeros((slots,), jnp.int32),
  )


def insert(
    params,
    state: Slots,
    prompt_up,
    prompt_valid_up,
    slot_r,
    source_r,
    keys_r,
    tables: StopTables,
    *,
    model,
):
  """Prefills `prompt_up` (left-padded, the tokens after the shared prefix) and starts row r in
  slot `slot_r[r]` from prompt `source_r[r]` with sampling key `keys_r[r]`; a slot index past the
  last slot leaves the row out (padding of the bucketed shape)."""
  p = prompt_up.shape[1]
  context = state.cache.context
  prefix = context[:-1]
  prompts = context[-1]
  width = prompts.length
  if p > width:
    raise ValueError(f"prompt bucket {p} is longer than the slots' prompt room {width}")
  logits_uv, fresh, first_position_u = prefill_prompts(
      params, prompt_up, prompt_valid_up, prefix[0] if prefix else None, model=model
  )
  put = lambda buffer, rows: buffer.at[slot_r].set(rows.astype(buffer.dtype), mode="drop")
  put_right = lambda buffer, new: jax.tree.map(
      lambda b, n: b.at[slot_r, :, width - p :].set(n[source_r].astype(b.dtype), mode="drop"),
      buffer,
      new,
  )
  positions_us = jnp.pad(fresh.positions_gs, ((0, 0), (width - p, 0)), constant_values=-1)
  prompts = Context(
      tuple(put_right(k, new) for k, new in zip(prompts.keys, fresh.keys)),
      tuple(put_right(v, new) for v, new in zip(prompts.values, fresh.values)),
      put(prompts.positions_gs, positions_us[source_r]),
  )
  r = slot_r.shape[0]
  cache = state.cache.replace(
      valid_bs=put(state.cache.valid_bs, jnp.zeros((r, state.cache.slots), bool)),
      index=put(state.cache.index, jnp.zeros((r,), jnp.int32)),
      context=prefix + (prompts,),
  )
  return Slots(
      cache=cache,
      logits_sv=put(state.logits_sv, logits_uv[source_r]),
      tokens_sm=put(state.tokens_sm, jnp.full((r, state.tokens_sm.shape[1]), tables.pad_id)),
      keys_s=put(state.keys_s, keys_r),
      first_position_s=put(state.first_position_s, first_position_u[source_r]),
      prev_s=put(state.prev_s, jnp.full((r,), tables.pad_id)),
      live_s=put(state.live_s, jnp.ones((r,), bool)),
      lengths_s=put(state.lengths_s, jnp.zeros((r,), jnp.int32)),
  )


def step(
    params,
    s: Slots,
    tables: StopTables,
    *,
    model,
    sampling: SamplingConfig,
    rows: NamedSharding | None = None,
) -> Slots:
  """One decode step for every live slot: a token chosen from its logits, the row stopped at EOS,
  a blank line or the budget (its own buffer full), as in `decode.generate`."""
  budget = s.tokens_sm.shape[1]
  step_s = s.cache.index
  banned_sv = tables.never_v[None, :] | ((step_s == 0)[:, None] & tables.special_v[None, :])
  logits_sv = jnp.where(banned_sv, NEG_INF, s.logits_sv)
  step_keys_s = jax.vmap(jax.random.fold_in)(s.keys_s, step_s)
  token_s = choose_tokens(logits_sv, step_keys_s, sampling, rows)
  token_s = jnp.where(s.live_s, token_s, tables.pad_id)
  written_sm = jax.nn.one_hot(step_s, budget, dtype=bool) & s.live_s[:, None]
  tokens_sm = jnp.where(written_sm, token_s[:, None], s.tokens_sm)
  stops_s = stop_tokens(tables, s.prev_s, token_s) | (step_s + 1 >= budget)
  logits_s1v, _, cache = model.apply(
      {"params": params},
      token_s[:, None],
      (s.first_position_s + step_s)[:, None],
      s.live_s[:, None],
      s.cache,
  )
  live_s = s.live_s & ~stops_s
  prompts = cache.context[-1]
  prompts = prompts.replace(positions_gs=jnp.where(live_s[:, None], prompts.positions_gs, -1))
  return s.replace(
      cache=cache.replace(
          index=jnp.where(live_s, step_s + 1, 0), context=cache.context[:-1] + (prompts,)
      ),
      logits_sv=logits_s1v[:, 0].astype(s.logits_sv.dtype),
      tokens_sm=tokens_sm,
      prev_s=token_s,
      live_s=live_s,
      lengths_s=jnp.where(s.live_s, step_s + 1, s.lengths_s),
  )


def advance(
    params,
    state: Slots,
    free_to_stop,
    tables: StopTables,
    *,
    model,
    sampling: SamplingConfig,
    rows: NamedSharding | None = None,
) -> Slots:
  """Decode steps (`step`) until no slot is live or `free_to_stop` slots are free."""

  def cond(s: Slots):
    return jnp.any(s.live_s) & (jnp.sum(~s.live_s) < free_to_stop)

  body = lambda s: step(params, s, tables, model=model, sampling=sampling, rows=rows)
  return jax.lax.while_loop(cond, body, state)


def compact(state: Slots, keep_k) -> Slots:
  """The slots `keep_k` (the live ones, padded with free ones) as a smaller set: each row's
  caches, prompt, tokens and key move with it, so a tail with few rows still running steps at
  the smaller size and computes what it would have in the larger one."""
  take = lambda x: jnp.take(x, keep_k, axis=0)
  cache = state.cache
  moved = jax.tree.map(take, state.replace(cache=cache.replace(context=cache.context[-1:])))
  return moved.replace(cache=moved.cache.replace(context=cache.context[:-1] + moved.cache.context))
