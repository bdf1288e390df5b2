"""Training batches: tokenise once, order an epoch so no batch repeats a question, pad to buckets.

Shapes are bucketed (multiples of `bucket`) so the jitted step compiles once per bucket, and the
last batch of an epoch is filled with masked rows so every example is seen exactly once.
"""
from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

import numpy as np

from tailored_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TrainExample:
  """One teacher rationale to learn from: `continuation` is the text after the prefix."""
  qid: str
  continuation: str


def round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def epoch_order(qids: list[str], batch_size: int, seed: int) -> list[list[int]]:
  """Indices into `qids`, in batches of distinct questions; every index appears exactly once.

  Examples of one question are spread across levels (its 1st, 2nd, … example); a batch that would
  take a question twice defers the example to the next batch.
  """
  rng = random.Random(seed)
  by_question: dict[str, list[int]] = defaultdict(list)
  for i, q in enumerate(qids):
    by_question[q].append(i)
  questions = sorted(by_question)
  for q in questions:
    rng.shuffle(by_question[q])
  stream: list[int] = []
  level = 0
  while True:
    at_level = [q for q in questions if len(by_question[q]) > level]
    if not at_level:
      break
    rng.shuffle(at_level)
    stream.extend(by_question[q][level] for q in at_level)
    level += 1
  batches: list[list[int]] = []
  pending = stream
  while pending:
    batch, seen, deferred = [], set(), []
    for pos, i in enumerate(pending):
      if len(batch) == batch_size:
        deferred.extend(pending[pos:])
        break
      if qids[i] in seen:
        deferred.append(i)
      else:
        batch.append(i)
        seen.add(qids[i])
    batches.append(batch)
    pending = deferred
  return batches


class Batcher:
  """Builds numpy batches for `train.step`: LM arrays always, a/p/n arrays for self-reflection."""

  def __init__(self, tokenizer: Tokenizer, prefixes: dict[str, str], examples: list[TrainExample],
               negatives: dict[str, list[str]], *, batch_size: int, max_seq_len: int,
               max_continuation_len: int, prefix_weight: float, max_positives: int,
               max_negatives: int, sr_batch_size: int = 0, bucket: int = 16):
    self.tok = tokenizer
    self.examples = examples
    self.batch_size = batch_size
    self.sr_batch_size = sr_batch_size or batch_size
    self.prefix_weight = prefix_weight
    self.max_positives = max_positives
    self.max_negatives = max_negatives
    self.qids = [e.qid for e in examples]
    missing = sorted({q for q in self.qids if q not in prefixes})
    if missing:
      raise KeyError(f"training examples refer to unknown questions: {missing[:5]}")
    self.prefix_ids = {q: tokenizer.bos() + ids for q, ids in
                       zip(prefixes, tokenizer.encode_batch(list(prefixes.values())))}
    eos = [tokenizer.eos_id]
    self.cont_ids = [ids + eos for ids in
                     tokenizer.encode_batch([e.continuation for e in examples])]
    self.negative_ids = {q: [ids + eos for ids in tokenizer.encode_batch(texts)]
                         for q, texts in negatives.items() if texts}
    self.positives_of: list[list[int]] = []
    by_question: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
      by_question[e.qid].append(i)
    for i, e in enumerate(examples):
      self.positives_of.append([j for j in by_question[e.qid]
                                if examples[j].continuation != e.continuation])
    full = [len(self.prefix_ids[q]) + len(c) for q, c in zip(self.qids, self.cont_ids)]
    self.truncated = sum(n > max_seq_len for n in full)
    self.seq_len = min(round_up(max(full, default=1), bucket), max_seq_len)
    self.prefix_len = round_up(max((len(p) for p in self.prefix_ids.values()), default=1), bucket)
    longest_cont = max([len(c) for c in self.cont_ids]
                       + [len(c) for cs in self.negative_ids.values() for c in cs], default=1)
    self.cont_len = min(round_up(longest_cont, bucket), max_continuation_len)
    self.sr_candidates = sum(1 for i, q in enumerate(self.qids)
                             if self.positives_of[i] and q in self.negative_ids)

  def __len__(self) -> int:
    return len(self.examples)

  def has_self_reflection(self) -> bool:
    return self.sr_candidates > 0

  def epoch(self, seed: int) -> list[list[int]]:
    return epoch_order(self.qids, self.batch_size, seed)

  def build(self, indices: list[int], seed: int, self_reflection: bool) -> dict[str, np.ndarray]:
    b, length = self.batch_size, self.seq_len
    inputs = np.zeros((b, length), np.int32)
    targets = np.zeros((b, length), np.int32)
    input_mask = np.zeros((b, length), bool)
    target_mask = np.zeros((b, length), bool)
    weights = np.zeros((b, length), np.float32)
    for row, i in enumerate(indices):
      prefix = self.prefix_ids[self.qids[i]]
      seq = (prefix + self.cont_ids[i])[:length + 1]
      n = len(seq) - 1
      inputs[row, :n] = seq[:-1]
      targets[row, :n] = seq[1:]
      input_mask[row, :n] = True
      target_mask[row, :n] = True
      # target j predicts seq[j+1]: a prefix token while j + 1 < len(prefix)
      weights[row, :n] = np.where(np.arange(1, n + 1) < len(prefix), self.prefix_weight, 1.0)
    batch = {"inputs": inputs, "targets": targets, "input_mask": input_mask,
             "target_mask": target_mask, "target_weights": weights}
    if self_reflection:
      batch.update(self._self_reflection_arrays(indices, random.Random(seed)))
    return batch

  def _self_reflection_arrays(self, indices, rng: random.Random):
    """Rows of anchor/positive/negative continuations after a left-padded prefix.

    Rows whose question has both a different teacher rationale and a student mistake get
    sr_mask 1; when more than `sr_batch_size` rows qualify, a seeded random subset is used.
    """
    b, p, c = self.sr_batch_size, self.prefix_len, self.cont_len
    prefix = np.zeros((b, p), np.int32)
    prefix_mask = np.zeros((b, p), bool)
    conts = np.zeros((b, 3, c), np.int32)
    cont_mask = np.zeros((b, 3, c), bool)
    sr_mask = np.zeros((b,), np.float32)
    eligible = [i for i in indices if self.positives_of[i] and self.qids[i] in self.negative_ids]
    if len(eligible) > b:
      eligible = sorted(rng.sample(eligible, b), key=eligible.index)
    for row, i in enumerate(eligible):
      ids = self.prefix_ids[self.qids[i]][-p:]
      prefix[row, p - len(ids):] = ids
      prefix_mask[row, p - len(ids):] = True
      positive = self.cont_ids[rng.choice(self.positives_of[i][:self.max_positives])]
      negative = rng.choice(self.negative_ids[self.qids[i]][:self.max_negatives])
      sr_mask[row] = 1.0
      for k, ids in enumerate((self.cont_ids[i], positive, negative)):
        ids = ids[:c]
        conts[row, k, :len(ids)] = ids
        cont_mask[row, k, :len(ids)] = True
    return {"prefix": prefix, "prefix_mask": prefix_mask, "continuations": conts,
            "continuation_mask": cont_mask, "sr_mask": sr_mask}
