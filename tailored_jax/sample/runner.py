"""Host side of generation: tokenise prompts, bucket and batch them, decode, report rates."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Callable

import jax
import numpy as np

from tailored_jax import preemption, sharding
from tailored_jax.data.batching import round_up
from tailored_jax.progress import Progress
from tailored_jax.sample import memory
from tailored_jax.sample.decode import Decoder
from tailored_jax.sample.sampling import SamplingConfig, sample_keys


def left_pad(rows: list[list[int]], length: int, batch: int, pad_id: int):
  tokens = np.full((batch, length), pad_id, np.int32)
  valid = np.zeros((batch, length), bool)
  for i, ids in enumerate(rows):
    ids = ids[-length:]
    tokens[i, length - len(ids) :] = ids
    valid[i, length - len(ids) :] = True
  return tokens, valid


def prompt_hash(prompt: str) -> int:
  """A stable 32-bit hash of a prompt's text (Python's hash() changes between processes)."""
  return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")


_sample_keys = jax.jit(sample_keys, static_argnums=2)

MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is prefilled with each prompt


def shared_prefix_length(encoded: list[list[int]]) -> int:
  """How many leading tokens every prompt has in common, leaving each at least one of its own
  (the prompts are tokenised whole, so a prefix's tokens are exactly the whole prompt's)."""
  if not encoded:
    return 0
  common = os.path.commonprefix(encoded)  # works on any sequences: min and max compared by item
  return max(0, min(len(common), min(len(ids) for ids in encoded) - 1))


def generate_texts(
    decoder: Decoder,
    params,
    tokenizer,
    prompts: list[str],
    *,
    mesh,
    num_samples: int,
    sampling: SamplingConfig,
    max_new_tokens: int,
    batch_size: int,
    rng,
    label: str,
    bucket: int = 32,
    share_prefix: bool = True,
    decode_layout: str = "train",
    memory_budget_bytes: int = 0,
    on_batch: Callable[[list[int], list[list[str]]], None] | None = None,
) -> list[list[str]]:
  """`num_samples` continuations per prompt, as text (special tokens dropped).

  With `share_prefix`, the tokens every prompt starts with (a task's few-shot demos) are
  prefilled once and their keys and values shared by every row. `decode_layout` names the layout
  `params` are in (`sharding.decode_shardings`); rows split over the mesh axes that
  `sharding.decode_row_axes` gives for it.
  `batch_size` prompts per batch at most: fewer if their KV cache would not fit
  `memory_budget_bytes` per device (0: half the device's free memory); one batch size for the
  call, so it compiles once per length bucket. `on_batch(indices, samples)` is called as each
  batch is decoded (its prompts' indices and their texts), e.g. to send mistakes on while the
  next batch decodes.
  """
  encoded = tokenizer.encode_batch(prompts)
  shared = shared_prefix_length(encoded) if share_prefix else 0
  prefix = None
  if shared >= MIN_SHARED_PREFIX:
    prefix_tokens = np.asarray(encoded[0][:shared], np.int32)
    prefix = decoder.prefill(params, sharding.put_global(prefix_tokens, sharding.replicated(mesh)))
    encoded = [ids[shared:] for ids in encoded]
  else:
    shared = 0
  compilations_before = decoder.compilations
  need = memory.decode_memory(
      decoder.model.cfg,
      round_up(max(len(ids) for ids in encoded), bucket),
      max_new_tokens,
      num_samples,
      shared,
  )
  row_axes = sharding.decode_row_axes(decode_layout, jax.tree.map(lambda x: x.sharding, params))
  rows = sharding.decode_batch_sharding(mesh, 2, row_axes)
  row_shards = int(np.prod([mesh.shape[axis] for axis in row_axes]))
  budget = sharding.smallest(memory_budget_bytes or memory.device_budget_bytes())
  requested = batch_size
  wanted = min(batch_size, round_up(len(prompts), row_shards))  # no batch beyond the prompts
  batch_size = memory.fit_batch(wanted, need.total, budget, row_shards)
  logging.log(
      logging.WARNING if batch_size < wanted else logging.INFO,  # shrunk to fit the memory
      "%s: %d prompts x %d samples per batch (asked %d), %.1f MiB per prompt (KV cache %.1f MiB) "
      "of a %.0f MiB budget per device",
      label,
      batch_size,
      num_samples,
      requested,
      need.total / 2**20,
      need.kv_cache / 2**20,
      budget / 2**20,
  )
  order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths together
  outputs: list[list[str]] = [[] for _ in prompts]
  start = time.time()
  generated_tokens = 0
  rows_done = 0
  progress = Progress(label, len(prompts), "prompts")
  for at in range(0, len(order), batch_size):
    preemption.stop_if_noticed("between decode batches (decoding runs again on resume)")
    chunk = order[at : at + batch_size]
    length = round_up(max(len(encoded[i]) for i in chunk), bucket)
    tokens, valid = left_pad([encoded[i] for i in chunk], length, batch_size, tokenizer.pad_id)
    put = lambda a: sharding.put_global(a, sharding.decode_batch_sharding(mesh, a.ndim, row_axes))
    hashes = np.zeros((batch_size,), np.uint32)
    hashes[: len(chunk)] = [prompt_hash(prompts[i]) for i in chunk]
    keys = np.asarray(_sample_keys(rng, hashes, num_samples))
    out, lengths = decoder(
        params,
        put(tokens),
        put(valid),
        put(keys),
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        sampling=sampling,
        prefix=prefix,
        rows=rows,
    )
    out, lengths = sharding.to_host(out), sharding.to_host(lengths)
    texts = tokenizer.decode_batch([row[:n] for row, n in zip(out, lengths)])
    for j, i in enumerate(chunk):
      outputs[i] = texts[j * num_samples : (j + 1) * num_samples]
    if on_batch is not None:
      on_batch(chunk, [outputs[i] for i in chunk])
    generated_tokens += int(lengths[: len(chunk) * num_samples].sum())
    rows_done += len(chunk) * num_samples
    progress.update(
        len(chunk), tokens_per_s=f"{generated_tokens / max(time.time() - start, 1e-9):.0f}"
    )
  progress.close()
  elapsed = max(time.time() - start, 1e-9)
  logging.info(
      "%s: %d sequences, %d tokens in %.1fs (%.1f seq/s, %.0f tokens/s); shared prefix %d tokens, "
      "%d new compilations",
      label,
      rows_done,
      generated_tokens,
      elapsed,
      rows_done / elapsed,
      generated_tokens / elapsed,
      shared,
      decoder.compilations - compilations_before,
  )
  return outputs
