"""Training batches: tokenise once, order an epoch so no batch repeats a question, pad to buckets.

Shapes are bucketed (multiples of `bucket`) so the jitted step compiles once per bucket, and the
last batch of an epoch is filled with masked rows so every example is seen exactly once.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

import flax.struct
import numpy as np

from tailored_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TrainExample:
  """One teacher rationale to learn from: `continuation` is the text after the prefix."""

  qid: str
  continuation: str


@flax.struct.dataclass
class LMBatch:
  """Next-token arrays [batch, seq]: filler rows and padding have masks 0; prefix targets weigh
  `train.prefix_weight`, continuation targets 1 (METHOD §3)."""

  inputs: np.ndarray  # int32
  targets: np.ndarray  # int32
  input_mask: np.ndarray  # bool
  target_mask: np.ndarray  # bool
  target_weights: np.ndarray  # float32


@flax.struct.dataclass
class ReflectionBatch:
  """Self-reflection rows: a left-padded shared prefix [rows, p] and the anchor, positive and
  negative continuations [rows, 3, c]; `sr_mask` [rows] is 0 where a row has no triplet;
  when the step reuses the LM forward (`train.sr_reuse_lm_forward`) the anchor slot is left
  empty and row r is LM row r, or with fewer rows than the LM batch, LM row `lm_rows[r]`."""

  prefix: np.ndarray  # int32
  prefix_mask: np.ndarray  # bool
  continuations: np.ndarray  # int32
  continuation_mask: np.ndarray  # bool
  sr_mask: np.ndarray  # float32
  lm_rows: np.ndarray | None = None  # int32


def round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def epoch_order(
    qids: list[str],
    batch_size: int,
    seed: int,
    lengths: list[int] | None = None,
    window_batches: int = 16,
) -> list[list[int]]:
  """Indices into `qids`, in batches of distinct questions; every index appears exactly once.

  Examples of one question are spread across levels (its 1st, 2nd, … example); a batch that would
  take a question twice defers the example to the next batch. With `lengths`, each window of
  `window_batches` batches' worth of that stream is sorted by length before it is cut into
  batches (a window's last, unfilled batch carries into the next), and the batches are then
  shuffled: batches of similar lengths, in random order.
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
  if lengths is None:
    return _distinct_batches(stream, qids, batch_size)
  window = batch_size * window_batches
  batches: list[list[int]] = []
  carry: list[int] = []
  for start in range(0, len(stream), window):
    last = start + window >= len(stream)
    chunk = sorted(carry + stream[start : start + window], key=lambda i: lengths[i])
    cut = _distinct_batches(chunk, qids, batch_size)
    carry = [] if last or len(cut[-1]) == batch_size else cut.pop()
    batches.extend(cut)
  rng.shuffle(batches)
  return batches


def _distinct_batches(pending: list[int], qids: list[str], batch_size: int) -> list[list[int]]:
  """`pending` cut in order into batches of distinct questions (a repeat waits for the next)."""
  batches: list[list[int]] = []
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
  """Builds numpy batches for `train.step`: LM arrays always, a/p/n arrays for self-reflection.

  Every training string (prefix ⊕ continuation, and prefix ⊕ negative) is tokenised once and
  split at the prefix's character offset; EOS ends it unless the tokenizer already put one there.
  Self-reflection candidates (METHOD §3): per example, at most `max_positives` other rationales
  of its question and `max_negatives` mistakes, drawn at random once per round (`seed`).
  """

  def __init__(
      self,
      tokenizer: Tokenizer,
      prefixes: dict[str, str],
      examples: list[TrainExample],
      negatives: dict[str, list[str]],
      *,
      batch_size: int,
      max_seq_len: int,
      max_continuation_len: int,
      prefix_weight: float,
      max_positives: int,
      max_negatives: int,
      sr_batch_size: int = 0,
      bucket: int = 16,
      seed: int = 0,
      length_bucket: int = 0,
      sr_reuse_lm_forward: bool = False,
  ):
    self.tok = tokenizer
    self.examples = examples
    self.batch_size = batch_size
    self.sr_batch_size = sr_batch_size or batch_size
    self.length_bucket = length_bucket
    # the LM rows also read their last token (EOS), whose hidden state is then the anchor's
    self.sr_reuse_lm_forward = sr_reuse_lm_forward
    self.prefix_weight = prefix_weight
    self.qids = [e.qid for e in examples]
    missing = sorted({q for q in self.qids if q not in prefixes})
    if missing:
      raise KeyError(f"training examples refer to unknown questions: {missing[:5]}")
    # (ids, number of prefix ids) per example, and per question per negative
    self.sequences = self._tokenise(prefixes, [(e.qid, e.continuation) for e in examples])
    negative_pairs = [
        (q, text) for q, texts in negatives.items() if q in prefixes for text in texts
    ]
    negative_sequences = self._tokenise(prefixes, negative_pairs)
    self.negatives_of: dict[str, list[tuple[list[int], int]]] = defaultdict(list)
    for (q, _), sequence in zip(negative_pairs, negative_sequences):
      self.negatives_of[q].append(sequence)
    rng = random.Random(seed)
    by_question: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
      by_question[e.qid].append(i)
    self.positives_of: list[list[int]] = []
    self.negative_choices: list[list[int]] = []
    for i, e in enumerate(examples):
      others = [j for j in by_question[e.qid] if examples[j].continuation != e.continuation]
      self.positives_of.append(_draw(others, max_positives, rng))
      self.negative_choices.append(
          _draw(list(range(len(self.negatives_of.get(e.qid, [])))), max_negatives, rng)
      )
    full = [len(ids) for ids, _ in self.sequences]
    self.truncated = sum(n > max_seq_len for n in full)
    self.seq_len = min(round_up(max(full, default=1), bucket), max_seq_len)
    self.prefix_len = round_up(max((split for _, split in self.sequences), default=1), bucket)
    longest_cont = max(
        [len(ids) - split for ids, split in self.sequences]
        + [len(ids) - split for ids, split in negative_sequences],
        default=1,
    )
    self.cont_len = min(round_up(longest_cont, bucket), max_continuation_len)
    self.sr_candidates = sum(1 for i in range(len(examples)) if self._eligible(i))
    # The one place that decides whether this round's steps carry the triplet loss.
    self.self_reflection = self.sr_candidates > 0

  def _tokenise(
      self, prefixes: dict[str, str], pairs: list[tuple[str, str]]
  ) -> list[tuple[list[int], int]]:
    texts = [prefixes[q] + continuation for q, continuation in pairs]
    out = []
    for ids, split in self.tok.encode_split(texts, [len(prefixes[q]) for q, _ in pairs]):
      if not ids or ids[-1] != self.tok.eos_id:
        ids = ids + [self.tok.eos_id]
      out.append((ids, split))
    return out

  def _eligible(self, i: int) -> bool:
    return bool(self.positives_of[i]) and bool(self.negative_choices[i])

  def __len__(self) -> int:
    return len(self.examples)

  def epoch(self, seed: int) -> list[list[int]]:
    """One epoch's batches; with `length_bucket`, batches of similar lengths (in random order)."""
    lengths = [len(ids) for ids, _ in self.sequences] if self.length_bucket else None
    return epoch_order(self.qids, self.batch_size, seed, lengths)

  def lm_length(self, indices: list[int]) -> int:
    """The LM arrays' length for a batch: the round's longest string, or with `length_bucket`
    the batch's own longest rounded up to a multiple of it (fewer padded positions; one
    compiled step per distinct length)."""
    if not self.length_bucket:
      return self.seq_len
    reads_eos = int(self.sr_reuse_lm_forward)
    longest = max((len(self.sequences[i][0]) - 1 + reads_eos for i in indices), default=1)
    return min(round_up(longest, self.length_bucket), self.seq_len)

  def padding(self, batches: list[list[int]]) -> tuple[float, int]:
    """(share of the LM arrays' positions that are padding or filler rows, distinct lengths)
    over a round's batches."""
    lengths = [self.lm_length(indices) for indices in batches]
    real = sum(
        min(len(self.sequences[i][0]) - 1, length)
        for indices, length in zip(batches, lengths)
        for i in indices
    )
    padded = self.batch_size * sum(lengths)
    return (1.0 - real / padded if padded else 0.0), len(set(lengths))

  def build(self, indices: list[int], seed: int) -> tuple[LMBatch, ReflectionBatch | None]:
    """The step's arrays for `indices`; the reflection rows (drawn with `seed`) exist exactly
    when the round trains self-reflection."""
    b, length = self.batch_size, self.lm_length(indices)
    inputs = np.zeros((b, length), np.int32)
    targets = np.zeros((b, length), np.int32)
    input_mask = np.zeros((b, length), bool)
    target_mask = np.zeros((b, length), bool)
    weights = np.zeros((b, length), np.float32)
    for row, i in enumerate(indices):
      ids, split = self.sequences[i]
      seq = ids[: length + 1]
      n = len(seq) - 1
      inputs[row, :n] = seq[:-1]
      targets[row, :n] = seq[1:]
      input_mask[row, :n] = True
      target_mask[row, :n] = True
      # target j predicts seq[j+1]: a prefix token while j + 1 < split
      weights[row, :n] = np.where(np.arange(1, n + 1) < split, self.prefix_weight, 1.0)
      if self.sr_reuse_lm_forward and len(seq) <= length:  # no target: only its hidden state
        inputs[row, n] = seq[-1]
        input_mask[row, n] = True
    lm = LMBatch(inputs, targets, input_mask, target_mask, weights)
    if not self.self_reflection:
      return lm, None
    return lm, self._reflection_rows(indices, length, random.Random(seed))

  def _reflection_rows(self, indices, lm_length: int, rng: random.Random) -> ReflectionBatch:
    """Rows of anchor/positive/negative continuations after a left-padded prefix.

    Rows whose question has both a different teacher rationale and a student mistake get
    sr_mask 1; when more than `sr_batch_size` rows qualify, a seeded random subset is used.
    Reusing the LM forward, a row also needs its whole string in the LM row (EOS read), and
    with `length_bucket` the continuations are padded to the batch's own longest.
    """
    b, p = self.sr_batch_size, self.prefix_len
    reuse = self.sr_reuse_lm_forward
    aligned = reuse and b == self.batch_size
    eligible = [
        (row, i)
        for row, i in enumerate(indices)
        if self._eligible(i) and (not reuse or len(self.sequences[i][0]) <= lm_length)
    ]
    if len(eligible) > b:
      eligible = sorted(rng.sample(eligible, b))
    chosen = []
    for lm_row, i in eligible:
      positive = self.sequences[rng.choice(self.positives_of[i])]
      negative = self.negatives_of[self.qids[i]][rng.choice(self.negative_choices[i])]
      chosen.append((lm_row, i, (None if reuse else self.sequences[i], positive, negative)))
    c = self.cont_len
    if self.length_bucket:
      longest = max(
          (len(ids) - at for *_, triple in chosen for ids, at in filter(None, triple)), default=1
      )
      c = min(round_up(longest, self.length_bucket), self.cont_len)
    prefix = np.zeros((b, p), np.int32)
    prefix_mask = np.zeros((b, p), bool)
    conts = np.zeros((b, 3, c), np.int32)
    cont_mask = np.zeros((b, 3, c), bool)
    sr_mask = np.zeros((b,), np.float32)
    lm_rows = np.zeros((b,), np.int32)
    for row, (lm_row, i, triple) in enumerate(chosen):
      row = lm_row if aligned else row
      lm_rows[row] = lm_row
      ids, split = self.sequences[i]
      ids = ids[:split][-p:]
      prefix[row, p - len(ids) :] = ids
      prefix_mask[row, p - len(ids) :] = True
      sr_mask[row] = 1.0
      for k, sequence in enumerate(triple):
        if sequence is None:  # the anchor, when the LM forward provides it
          continue
        ids, at = sequence
        ids = ids[at:][:c]
        conts[row, k, : len(ids)] = ids
        cont_mask[row, k, : len(ids)] = True
    return ReflectionBatch(
        prefix, prefix_mask, conts, cont_mask, sr_mask, lm_rows if reuse and not aligned else None
    )


def _draw(candidates: list[int], limit: int, rng: random.Random) -> list[int]:
  """At most `limit` of `candidates`, drawn at random, in their original order."""
  if len(candidates) <= limit:
    return candidates
  return sorted(rng.sample(candidates, limit))
