"""How many prompts a decode batch can hold: the KV cache and per-step buffers a row needs, against
a memory budget (the device's free memory, or host RAM on CPU). Pure arithmetic, plus one probe."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from tailored_jax.models.kv_cache import cache_bytes_per_element


@dataclasses.dataclass(frozen=True)
class DecodeMemory:
  """Bytes one prompt of a decode batch needs on a device, by part."""

  kv_cache: int  # its k rows' own slots (prompt after the shared prefix + new tokens), all layers
  step: int  # per generated token: logits, attention scores, activations (k rows)
  prefill: int  # prefilling its own prompt tokens: attention scores and MLP activations

  @property
  def total(self) -> int:
    return self.kv_cache + max(self.step, self.prefill)

  def with_heads_split(self, ways: int) -> DecodeMemory:
    """On a device holding 1/`ways` of the heads (a model-parallel decode layout): its share of
    the keys and values; the per-step buffers counted whole (logits are not split)."""
    return dataclasses.replace(self, kv_cache=-(-self.kv_cache // ways))


def decode_memory(
    cfg, prompt_slots: int, max_new_tokens: int, num_samples: int, shared_prefix: int = 0
) -> DecodeMemory:
  """What one prompt (its `num_samples` rows) needs: float32 scores and logits, the cache's
  dtype for keys and values, the model's for activations. `prompt_slots` excludes the shared
  prefix."""
  item = np.dtype(cfg.dtype).itemsize
  cache_item = cache_bytes_per_element(cfg)
  slots = prompt_slots + max_new_tokens
  seen = shared_prefix + slots
  kv = int(2 * cfg.n_layers * slots * cfg.n_kv_heads * cfg.head_dim * cache_item)
  step = (
      4 * cfg.vocab_size * 3 + 4 * cfg.n_heads * seen * 2 + item * (cfg.d_ff * 3 + cfg.d_model * 4)
  )
  prefill = 4 * cfg.n_heads * prompt_slots * (
      shared_prefix + prompt_slots
  ) * 2 + item * prompt_slots * (cfg.d_ff * 3 + cfg.d_model * 4)
  return DecodeMemory(kv_cache=kv * num_samples, step=step * num_samples, prefill=prefill)


def _memory_stats() -> dict | None:
  """The first local device's allocator statistics, or None where it has no limit (CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    return None
  return stats if stats and stats.get("bytes_limit") else None


def device_budget_bytes(fraction: float = 0.5) -> int:
  """`fraction` of the first local device's free memory (host RAM available on CPU, where
  devices report no memory statistics)."""
  stats = _memory_stats()
  if stats:
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  else:
    free = host_available_bytes()
  return int(free * fraction)


def device_memory_bytes() -> int:
  """One device's memory: its allocator's limit on GPU/TPU; on CPU, the host's available memory
  shared by its local devices."""
  stats = _memory_stats()
  if stats:
    return int(stats["bytes_limit"])
  return host_available_bytes() // jax.local_device_count()


def host_available_bytes() -> int:
  """MemAvailable (free memory plus reclaimable page cache), or free pages where /proc is
  missing."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fit_batch(requested: int, per_prompt_bytes: int, budget_bytes: int, row_shards: int) -> int:
  """The largest batch ≤ `requested` whose share per device (rows split over `row_shards`
  devices) fits the budget, as a multiple of `row_shards` (at least `row_shards`)."""
  per_device = max(1, budget_bytes // max(per_prompt_bytes, 1))
  batch = min(requested, per_device * row_shards)
  return max(row_shards, batch // row_shards * row_shards)
