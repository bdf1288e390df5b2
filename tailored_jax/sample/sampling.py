"""Next-token choice from logits: greedy, or temperature with top-k and top-p (pure)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
      raise ValueError(
          f"bad sampling settings {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1"
      )


def nucleus(sorted_logits_bj, top_p: float):
  """Logits sorted in descending order, with those outside the smallest prefix of mass ≥ top_p
  set to -inf (a token is kept while the mass before it is below top_p; the first always is)."""
  if top_p >= 1.0:
    return sorted_logits_bj
  probs_bj = jax.nn.softmax(sorted_logits_bj, axis=-1)
  mass_before_bj = jnp.cumsum(probs_bj, axis=-1) - probs_bj
  return jnp.where(mass_before_bj < top_p, sorted_logits_bj, NEG_INF)


def filter_logits(logits_bv, top_k: int, top_p: float):
  """Logits outside the top-k, or outside the smallest set with mass ≥ top_p, set to -inf, over
  the whole vocabulary (a full sort when top_p < 1: the reference `choose_tokens` is tested on)."""
  if top_k and top_k < logits_bv.shape[-1]:
    kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_b1, NEG_INF, logits_bv)
  if top_p < 1.0:
    kept_bv = nucleus(jnp.sort(logits_bv, axis=-1)[:, ::-1], top_p)
    threshold_b1 = jnp.min(jnp.where(kept_bv > NEG_INF, kept_bv, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < threshold_b1, NEG_INF, logits_bv)
  return logits_bv


def top_k(logits_bv, k: int, rows: NamedSharding | None = None):
  """(values, ids) of each row's k largest logits. Given `rows`, the rows' sharding over a mesh,
  each device takes its own rows' (`shard_map`): XLA:CPU's TopK has no partitioning rule, so it
  would all-gather every row's logits first, at every decoded token."""
  if rows is None or rows.mesh.size == 1 or rows.spec[0] is None:
    return jax.lax.top_k(logits_bv, k)
  spec = PartitionSpec(rows.spec[0])
  per_device = lambda x_bv: tuple(jax.lax.top_k(x_bv, k))
  return tuple(
      jax.shard_map(per_device, mesh=rows.mesh, in_specs=spec, out_specs=(spec, spec))(logits_bv)
  )


def greedy_tokens(logits_bv):
  """argmax (the first of equal maxima) as one max and one min over the vocabulary: faster than
  `jnp.argmax`'s paired reduction on CPU."""
  v = logits_bv.shape[-1]
  is_max_bv = logits_bv == jnp.max(logits_bv, axis=-1, keepdims=True)
  return jnp.min(jnp.where(is_max_bv, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def choose_tokens(logits_bv, keys_b, cfg: SamplingConfig, rows: NamedSharding | None = None):
  """One token per row; row b draws with its own key `keys_b[b]`, so what a row samples does not
  depend on which other rows share its batch. With top-k, only the k best logits are filtered and
  drawn from (noise for k values, not the vocabulary; `top_k` per device given `rows`); top-p
  alone needs a full sort."""
  if cfg.temperature == 0.0:
    return greedy_tokens(logits_bv)
  logits_bv = logits_bv.astype(jnp.float32) / cfg.temperature
  if cfg.top_k and cfg.top_k < logits_bv.shape[-1]:
    top_bj, ids_bj = top_k(logits_bv, cfg.top_k, rows)
    choice_b = jax.vmap(jax.random.categorical)(keys_b, nucleus(top_bj, cfg.top_p))
    return jnp.take_along_axis(ids_bj, choice_b[:, None], axis=1)[:, 0].astype(jnp.int32)
  logits_bv = filter_logits(logits_bv, 0, cfg.top_p)
  return jax.vmap(jax.random.categorical)(keys_b, logits_bv).astype(jnp.int32)


def sample_keys(rng, prompt_hashes_b, num_samples: int):
  """Keys [B, k, 2]: sample j of the prompt with hash h draws from fold_in(fold_in(rng, h), j),
  a function of (prompt, sample) alone, never of the batch a prompt lands in."""
  per_prompt = jax.vmap(lambda h: jax.random.fold_in(rng, h))(prompt_hashes_b)
  return jax.vmap(
      lambda key: jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_samples))
  )(per_prompt)
