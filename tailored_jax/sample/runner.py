"""Host side of generation: tokenise prompts, bucket and batch them, decode, report rates."""
from __future__ import annotations

import hashlib
import logging
import time

import jax
import numpy as np

from tailored_jax import sharding
from tailored_jax.data.batching import round_up
from tailored_jax.sample.decode import Decoder
from tailored_jax.sample.sampling import SamplingConfig, sample_keys


def left_pad(rows: list[list[int]], length: int, batch: int, pad_id: int):
  tokens = np.full((batch, length), pad_id, np.int32)
  valid = np.zeros((batch, length), bool)
  for i, ids in enumerate(rows):
    ids = ids[-length:]
    tokens[i, length - len(ids):] = ids
    valid[i, length - len(ids):] = True
  return tokens, valid


def prompt_hash(prompt: str) -> int:
  """A stable 32-bit hash of a prompt's text (Python's hash() changes between processes)."""
  return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")


_sample_keys = jax.jit(sample_keys, static_argnums=2)


def generate_texts(decoder: Decoder, params, tokenizer, prompts: list[str], *, mesh,
                   num_samples: int, sampling: SamplingConfig, max_new_tokens: int, batch_size: int,
                   rng, label: str, bucket: int = 32) -> list[list[str]]:
  """`num_samples` continuations per prompt, as text (special tokens dropped)."""
  encoded = tokenizer.encode_batch(prompts)
  order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths together
  outputs: list[list[str]] = [[] for _ in prompts]
  start = time.time()
  generated_tokens = 0
  rows_done = 0
  for at in range(0, len(order), batch_size):
    chunk = order[at:at + batch_size]
    length = round_up(max(len(encoded[i]) for i in chunk), bucket)
    tokens, valid = left_pad([encoded[i] for i in chunk], length, batch_size, tokenizer.pad_id)
    put = lambda a: sharding.put_global(a, sharding.batch_sharding(mesh, a.ndim))
    hashes = np.zeros((batch_size,), np.uint32)
    hashes[:len(chunk)] = [prompt_hash(prompts[i]) for i in chunk]
    keys = np.asarray(_sample_keys(rng, hashes, num_samples))
    out, lengths = decoder(params, put(tokens), put(valid), put(keys),
                           max_new_tokens=max_new_tokens, num_samples=num_samples,
                           sampling=sampling)
    out, lengths = sharding.to_host(out), sharding.to_host(lengths)
    texts = tokenizer.decode_batch([row[:n] for row, n in zip(out, lengths)])
    for j, i in enumerate(chunk):
      outputs[i] = texts[j * num_samples:(j + 1) * num_samples]
    generated_tokens += int(lengths[:len(chunk) * num_samples].sum())
    rows_done += len(chunk) * num_samples
  elapsed = max(time.time() - start, 1e-9)
  logging.info("%s: %d sequences, %d tokens in %.1fs (%.1f seq/s, %.0f tokens/s)", label, rows_done,
               generated_tokens, elapsed, rows_done / elapsed, generated_tokens / elapsed)
  return outputs
