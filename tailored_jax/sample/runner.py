"""Host side of generation: tokenise prompts, bucket and batch them, decode, report rates."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Callable, Iterator

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
    continuous: bool = False,
    stats: dict | None = None,
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
  next batch decodes. With `continuous`, the batch's rows are decode slots that a stopped row
  frees for the next prompt's (`_slot_batches`): the same texts, fewer steps. `stats`, if
  given, receives the call's sequences, generated tokens and seconds.
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
  head_axes = sharding.decode_head_axes(decode_layout, mesh, decoder.model.cfg)
  rows = sharding.decode_batch_sharding(mesh, 2, row_axes)
  row_shards = int(np.prod([mesh.shape[axis] for axis in row_axes]))
  need = need.with_heads_split(int(np.prod([mesh.shape[axis] for axis in head_axes or ()])))
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
  job = _Job(
      decoder,
      params,
      tokenizer,
      prompts,
      encoded,
      order,
      prefix,
      mesh,
      row_axes,
      head_axes,
      rows,
      num_samples,
      sampling,
      max_new_tokens,
      batch_size,
      bucket,
      rng,
      label,
  )
  outputs: list[list[str]] = [[] for _ in prompts]
  start = time.time()
  generated_tokens = 0
  rows_done = 0
  progress = Progress(label, len(prompts), "prompts")
  for finished, samples, tokens in (_slot_batches if continuous else _static_batches)(job):
    for i, texts in zip(finished, samples):
      outputs[i] = texts
    if on_batch is not None and finished:
      on_batch(finished, samples)
    generated_tokens += tokens
    rows_done += len(finished) * num_samples
    progress.update(
        len(finished), tokens_per_s=f"{generated_tokens / max(time.time() - start, 1e-9):.0f}"
    )
  progress.close()
  elapsed = max(time.time() - start, 1e-9)
  if stats is not None:
    stats.update(sequences=rows_done, tokens=generated_tokens, seconds=elapsed)
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


@dataclasses.dataclass(frozen=True)
class _Job:
  """One `generate_texts` call's prompts (tokenised, after the shared prefix), in decode order."""

  decoder: Decoder
  params: object
  tokenizer: object
  prompts: list[str]
  encoded: list[list[int]]
  order: list[int]
  prefix: object
  mesh: object
  row_axes: tuple[str, ...]
  head_axes: tuple[str, ...] | None  # where the decode layout splits the heads (and the cache)
  rows: object
  num_samples: int
  sampling: SamplingConfig
  max_new_tokens: int
  batch_size: int
  bucket: int
  rng: object
  label: str

  def put_rows(self, array):
    return sharding.put_global(
        array, sharding.decode_batch_sharding(self.mesh, array.ndim, self.row_axes)
    )

  def keys(self, indices) -> np.ndarray:
    """[len(indices), samples, 2]: each prompt's sampling keys, from its text."""
    hashes = np.asarray([prompt_hash(self.prompts[i]) for i in indices], np.uint32)
    return np.asarray(_sample_keys(self.rng, hashes, self.num_samples))


Finished = tuple[list[int], list[list[str]], int]  # prompts done, their samples, tokens generated


def _static_batches(job: _Job) -> Iterator[Finished]:
  """Batches of `batch_size` prompts, each decoded until its longest row stops."""
  k = job.num_samples
  for at in range(0, len(job.order), job.batch_size):
    preemption.stop_if_noticed("between decode batches (decoding runs again on resume)")
    chunk = job.order[at : at + job.batch_size]
    length = round_up(max(len(job.encoded[i]) for i in chunk), job.bucket)
    tokens, valid = left_pad(
        [job.encoded[i] for i in chunk], length, job.batch_size, job.tokenizer.pad_id
    )
    keys = np.zeros((job.batch_size, k, 2), np.uint32)
    keys[: len(chunk)] = job.keys(chunk)
    out, lengths = job.decoder(
        job.params,
        job.put_rows(tokens),
        job.put_rows(valid),
        job.put_rows(keys),
        max_new_tokens=job.max_new_tokens,
        num_samples=k,
        sampling=job.sampling,
        prefix=job.prefix,
        rows=job.rows,
    )
    out, lengths = sharding.to_host(out), sharding.to_host(lengths)
    texts = job.tokenizer.decode_batch([row[:n] for row, n in zip(out, lengths)])
    samples = [texts[j * k : (j + 1) * k] for j in range(len(chunk))]
    yield chunk, samples, int(lengths[: len(chunk) * k].sum())


REFILL_FRACTION = 4  # refill once a quarter of the slots (or every pending row) is free


def refill_shape(slots: int, num_samples: int, row_shards: int) -> tuple[int, int]:
  """(rows, prompts) of one insert: `slots / REFILL_FRACTION` rows, from at most as many prompts
  as they can span (k samples each, the first and last partly), split evenly over the row
  shards."""
  refill = max(1, slots // REFILL_FRACTION)
  return refill, round_up(min(refill, -(-(refill - 1) // num_samples) + 1), row_shards)


def _slot_batches(job: _Job) -> Iterator[Finished]:
  """Continuous batching: `batch_size * num_samples` decode slots, one row (prompt, sample) each.
  Rows start longest prompt first (a longer question tends to take a longer answer, and the
  last rows to start decide how long the last slots run nearly empty). Once
  `slots / REFILL_FRACTION` of them (or all rows still waiting) have stopped, the next rows are
  prefilled into the free slots, in inserts of that many rows (prompts padded to their length
  bucket), while the others keep their caches. Once no row is left to start and no more rows
  run than a refill holds, the running ones move into that many slots (`Decoder.compact`), so
  the tail does not step the emptied slots."""
  k = job.num_samples
  decoder, pad = job.decoder, job.tokenizer.pad_id
  slots = job.batch_size * k
  row_shards = int(np.prod([job.mesh.shape[axis] for axis in job.row_axes]))
  refill, unique = refill_shape(slots, k, row_shards)
  logging.info(
      "%s: %d decode slots (%d prompts x %d samples), refilled %d rows at a time",
      job.label,
      slots,
      job.batch_size,
      k,
      refill,
  )
  pending = [(i, j) for i in reversed(job.order) for j in range(k)]
  keys = dict(zip(job.order, job.keys(job.order)))
  state = decoder.empty_slots(
      job.prefix,
      slots=slots,
      prompt_slots=round_up(max(len(ids) for ids in job.encoded), job.bucket),
      max_new_tokens=job.max_new_tokens,
      mesh=job.mesh,
      row_axes=job.row_axes,
      head_axes=job.head_axes,
  )
  replicated = lambda a: sharding.put_global(a, sharding.replicated(job.mesh))
  held: list[tuple[int, int] | None] = [None] * slots
  tail = round_up(refill, row_shards)  # the slots the last rows finish in
  texts: dict[int, list] = {}
  at = 0
  while True:
    preemption.stop_if_noticed("between decode batches (decoding runs again on resume)")
    size = len(held)
    free = [s for s in range(size) if held[s] is None]
    while at < len(pending) and free:
      group = pending[at : at + min(refill, len(free))]
      prompts = list(dict.fromkeys(i for i, _ in group))
      length = round_up(max(len(job.encoded[i]) for i in prompts), job.bucket)
      tokens, valid = left_pad([job.encoded[i] for i in prompts], length, unique, pad)
      slot_r = np.full((refill,), size, np.int32)  # past the last slot: no row
      source_r = np.zeros((refill,), np.int32)
      keys_r = np.zeros((refill, 2), np.uint32)
      for r, (i, j) in enumerate(group):
        slot_r[r], source_r[r], keys_r[r] = free[r], prompts.index(i), keys[i][j]
        held[free[r]] = (i, j)
      state = decoder.insert(
          job.params,
          state,
          job.put_rows(tokens),
          job.put_rows(valid),
          replicated(slot_r),
          replicated(source_r),
          replicated(keys_r),
      )
      free, at = free[len(group) :], at + len(group)
    if all(row is None for row in held):
      return
    waiting = len(pending) - at
    if waiting:
      free_to_stop = min(refill, waiting)
    elif tail < size:  # nothing left to start: run until the rest fits the tail's slots
      free_to_stop = size - tail
    else:
      free_to_stop = size + 1
    state = decoder.advance(job.params, state, free_to_stop, sampling=job.sampling, rows=job.rows)
    live = sharding.to_host(state.live_s)
    lengths = sharding.to_host(state.lengths_s)
    out = sharding.to_host(state.tokens_sm)
    ended = [s for s in range(size) if held[s] is not None and not live[s]]
    decoded = job.tokenizer.decode_batch([out[s, : lengths[s]] for s in ended])
    finished = []
    for s, text in zip(ended, decoded):
      i, j = held[s]
      held[s] = None
      texts.setdefault(i, [None] * k)[j] = text
      if all(t is not None for t in texts[i]):
        finished.append(i)
    running = [s for s in range(size) if held[s] is not None]
    if not waiting and running and tail < size and len(running) <= tail:
      keep = running + [s for s in range(size) if held[s] is None][: tail - len(running)]
      state = decoder.compact(
          state, keep, mesh=job.mesh, row_axes=job.row_axes, head_axes=job.head_axes
      )
      held = [held[s] for s in keep]
    yield finished, [texts.pop(i) for i in finished], int(sum(lengths[s] for s in ended))
