"""Batched KV-cache generation in one jitted while-loop: prefill once, k samples per prompt.

A prefix every prompt starts with (the few-shot demos) can be prefilled once (`prefill_prefix`)
and shared by all rows; then only each prompt's own tokens are prefilled per batch. Each row stops
on its own at EOS or a blank line (`\\n\\n`, one token or two) and the loop ends as soon as
every row has stopped (the release always ran the full budget).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from tailored_jax import sharding
from tailored_jax.models import for_decoding
from tailored_jax.models.kv_cache import Context, KVCache, cache_dtype
from tailored_jax.models.layers import is_stacked
from tailored_jax.sample import continuous
from tailored_jax.sample.prefill import prefill_prefix, prefill_prompts
from tailored_jax.sample.sampling import NEG_INF, SamplingConfig, choose_tokens
from tailored_jax.sample.stops import StopTables, stop_tokens


@flax.struct.dataclass
class DecodeState:
  """The while-loop carry: `tokens_nm` holds what each row generated so far (pad after it
  stopped), `logits_nv` the next-token logits, `prev_n` each row's last token."""

  step: jax.Array
  cache: KVCache
  logits_nv: jax.Array
  tokens_nm: jax.Array
  done_n: jax.Array
  prev_n: jax.Array
  lengths_n: jax.Array


def generate(
    params,
    prompt_bp,
    prompt_valid_bp,
    rng,
    tables: StopTables,
    prefix: Context | None = None,
    *,
    model,
    max_new_tokens: int,
    num_samples: int,
    sampling: SamplingConfig,
    rows: NamedSharding | None = None,
):
  """Returns (tokens [B*k, max_new_tokens] padded with pad_id, lengths [B*k]).

  Row b*k + j is sample j of prompt b. Prompts are left-padded; with a shared `prefix` they are
  the tokens after it. Each prompt is prefilled once and its keys and values are read by its k
  samples as a context (not copied k times); each row's cache holds only what it generates.
  `rng` is one key (row r draws with fold_in(rng, r)) or per-row keys [B, k, 2]
  (`sampling.sample_keys`); step t of a row draws with fold_in(its key, t). `rows`: the rows'
  sharding, for the per-device top-k (`sampling.top_k`).
  """
  cfg = model.cfg
  b = prompt_bp.shape[0]
  last_logits_bv, prompts, first_position_b = prefill_prompts(
      params, prompt_bp, prompt_valid_bp, prefix, model=model
  )
  context = () if prefix is None else (prefix,)
  n = b * num_samples
  cache = KVCache.zeros(
      cfg.n_layers,
      n,
      max_new_tokens,
      cfg.n_kv_heads,
      cfg.head_dim,
      cache_dtype(cfg),
      context + (prompts,),
  )
  if rng.ndim == 1:
    keys_n = jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(n))
  else:
    keys_n = rng.reshape(n, rng.shape[-1])
  next_position_n = jnp.repeat(first_position_b, num_samples)

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done_n)

  def body(s: DecodeState) -> DecodeState:
    banned_v = tables.never_v | ((s.step == 0) & tables.special_v)
    logits_nv = jnp.where(banned_v[None, :], NEG_INF, s.logits_nv)
    step_keys_n = jax.vmap(lambda key: jax.random.fold_in(key, s.step))(keys_n)
    token_n = choose_tokens(logits_nv, step_keys_n, sampling, rows)
    token_n = jnp.where(s.done_n, tables.pad_id, token_n)
    tokens_nm = jax.lax.dynamic_update_slice_in_dim(s.tokens_nm, token_n[:, None], s.step, axis=1)
    stops_n = stop_tokens(tables, s.prev_n, token_n)
    positions_n1 = (next_position_n + s.step)[:, None]
    logits_n1v, _, cache = model.apply(
        {"params": params}, token_n[:, None], positions_n1, (~s.done_n)[:, None], s.cache
    )
    return DecodeState(
        step=s.step + 1,
        cache=cache,
        logits_nv=logits_n1v[:, 0],
        tokens_nm=tokens_nm,
        done_n=s.done_n | stops_n,
        prev_n=token_n,
        lengths_n=s.lengths_n + (~s.done_n).astype(jnp.int32),
    )

  start = DecodeState(
      step=jnp.zeros((), jnp.int32),
      cache=cache,
      logits_nv=jnp.repeat(last_logits_bv, num_samples, axis=0),
      tokens_nm=jnp.full((n, max_new_tokens), tables.pad_id, jnp.int32),
      done_n=jnp.zeros((n,), bool),
      prev_n=jnp.full((n,), tables.pad_id, jnp.int32),
      lengths_n=jnp.zeros((n,), jnp.int32),
  )
  end = jax.lax.while_loop(cond, body, start)
  return end.tokens_nm, end.lengths_n


def slot_layout(
    model,
    prefix: Context | None,
    *,
    slots: int,
    prompt_slots: int,
    max_new_tokens: int,
    pad_id: int,
    mesh,
    row_axes: tuple[str, ...],
    head_axes: tuple[str, ...] | None,
):
  """`continuous.empty_slots` bound to its sizes, and where its arrays go
  (`sharding.decode_slot_shardings`): what the runner allocates and the planner compiles."""
  make = functools.partial(
      continuous.empty_slots,
      model=model,
      slots=slots,
      prompt_slots=prompt_slots,
      max_new_tokens=max_new_tokens,
      pad_id=pad_id,
  )
  placed = sharding.decode_slot_shardings(
      jax.eval_shape(make, prefix), mesh, slots, row_axes, head_axes
  )
  return make, placed


def _check_per_layer(params) -> None:
  if is_stacked(params):
    raise ValueError(
        "decoding takes per-layer weights; convert a scanned model's stacked ones "
        "with models.layers.unstack_layers"
    )


class Decoder:
  """Holds the jitted `generate` and `prefill_prefix` for one model and tokenizer; compiles once
  per shape, and counts the distinct shapes it compiled (`compilations`)."""

  def __init__(self, model, tables: StopTables):
    self.model = for_decoding(model)
    model = self.model
    self.tables = tables
    self._arrays = jax.tree.map(jnp.asarray, tables)
    self._jitted = {}
    self._prefill = jax.jit(functools.partial(prefill_prefix, model=model))
    self._shapes: set = set()
    self._insert = jax.jit(functools.partial(continuous.insert, model=model), donate_argnums=1)
    self._advance = {}
    self._empty = {}
    self._compact = {}

  @property
  def compilations(self) -> int:
    return len(self._shapes)

  def prefill(self, params, prefix_p) -> Context:
    _check_per_layer(params)
    self._shapes.add(("prefix", prefix_p.shape))
    return self._prefill(params, prefix_p)

  def __call__(
      self,
      params,
      prompt_bp,
      prompt_valid_bp,
      rng,
      *,
      max_new_tokens: int,
      num_samples: int,
      sampling: SamplingConfig,
      prefix: Context | None = None,
      rows: NamedSharding | None = None,
  ):
    _check_per_layer(params)
    key = (max_new_tokens, num_samples, sampling, rows)
    if key not in self._jitted:
      self._jitted[key] = jax.jit(
          functools.partial(
              generate,
              model=self.model,
              max_new_tokens=max_new_tokens,
              num_samples=num_samples,
              sampling=sampling,
              rows=rows,
          )
      )
    self._shapes.add(key + (prompt_bp.shape, rng.shape, None if prefix is None else prefix.length))
    return self._jitted[key](params, prompt_bp, prompt_valid_bp, rng, self._arrays, prefix)

  def empty_slots(
      self,
      prefix: Context | None,
      *,
      slots: int,
      prompt_slots: int,
      max_new_tokens: int,
      mesh,
      row_axes: tuple[str, ...],
      head_axes: tuple[str, ...] | None = None,
  ) -> continuous.Slots:
    """Free decode slots for continuous batching (`continuous.empty_slots`), placed by
    `sharding.decode_slot_shardings`: slots over `row_axes`, keys and values also over
    `head_axes` (where the decode layout splits the heads)."""
    key = (slots, prompt_slots, max_new_tokens, mesh, row_axes, head_axes, prefix is None)
    if key not in self._empty:
      make, placed = slot_layout(
          self.model,
          prefix,
          slots=slots,
          prompt_slots=prompt_slots,
          max_new_tokens=max_new_tokens,
          pad_id=self.tables.pad_id,
          mesh=mesh,
          row_axes=row_axes,
          head_axes=head_axes,
      )
      self._empty[key] = jax.jit(make, out_shardings=placed)
    return self._empty[key](prefix)

  def compact(self, state, keep, *, mesh, row_axes, head_axes=None) -> continuous.Slots:
    """The slots `keep` (host ints) as a smaller set (`continuous.compact`)."""
    key = ("compact", state.size, len(keep), mesh, row_axes, head_axes)
    if key not in self._compact:
      shapes = jax.eval_shape(continuous.compact, state, jnp.zeros((len(keep),), jnp.int32))
      self._compact[key] = jax.jit(
          continuous.compact,
          out_shardings=sharding.decode_slot_shardings(
              shapes, mesh, len(keep), row_axes, head_axes
          ),
      )
    self._shapes.add(key)
    keep = sharding.put_global(np.asarray(keep, np.int32), sharding.replicated(mesh))
    return self._compact[key](state, keep)

  def insert(self, params, state, prompt_up, prompt_valid_up, slot_r, source_r, keys_r):
    """Prefills prompts into free slots (`continuous.insert`); `state` is donated."""
    _check_per_layer(params)
    self._shapes.add(("insert", state.size, prompt_up.shape, slot_r.shape))
    return self._insert(
        params, state, prompt_up, prompt_valid_up, slot_r, source_r, keys_r, self._arrays
    )

  def advance(self, params, state, free_to_stop: int, *, sampling, rows=None):
    """Decodes the live slots until `free_to_stop` are free (`continuous.advance`); donates
    `state`."""
    key = (sampling, rows)
    if key not in self._advance:
      self._advance[key] = jax.jit(
          functools.partial(continuous.advance, model=self.model, sampling=sampling, rows=rows),
          donate_argnums=1,
      )
    self._shapes.add(("advance", state.size, state.tokens_sm.shape[1], key))
    return self._advance[key](params, state, jnp.int32(free_to_stop), self._arrays)
