import random

import numpy as np
import pytest

from tailored_jax.data import batching
from tailored_jax.data.tokenizer import train_bpe


def test_epoch_order_visits_every_example_once_with_distinct_questions():
  rng = random.Random(0)
  qids = [f"q{rng.randrange(12)}" for _ in range(100)] + ["q0"] * 10
  batches = batching.epoch_order(qids, batch_size=8, seed=3)
  flat = [i for b in batches for i in b]
  assert sorted(flat) == list(range(len(qids)))
  for b in batches:
    assert len(b) <= 8
    assert len({qids[i] for i in b}) == len(b)
  assert batches == batching.epoch_order(qids, batch_size=8, seed=3)
  assert batches != batching.epoch_order(qids, batch_size=8, seed=4)


def make_batcher(sr_batch_size=0, **options):
  tok = train_bpe(["Question: a b c\nReasoning: x y 1 2 3\nAnswer: 7"] * 4, 280)
  assert tok.encode("a")[0] == tok.bos_id  # the trained BPE starts every sequence with <s>
  prefixes = {"q1": "Question: a b\nReasoning:", "q2": "Question: c\nReasoning:"}
  examples = [
      batching.TrainExample("q1", " x 1\nAnswer: 1"),
      batching.TrainExample("q1", " y 1\nAnswer: 1"),
      batching.TrainExample("q2", " x y 2\nAnswer: 2"),
  ]
  negatives = {"q1": [" x 2\nAnswer: 2"], "q2": [" y\nAnswer: 3"]}
  return tok, batching.Batcher(
      tok,
      prefixes,
      examples,
      negatives,
      batch_size=4,
      max_seq_len=64,
      max_continuation_len=32,
      prefix_weight=0.1,
      max_positives=10,
      max_negatives=4,
      sr_batch_size=sr_batch_size,
      **options,
  )


def test_lm_arrays_weights_and_padding():
  tok, batcher = make_batcher()
  lm, _ = batcher.build([0, 2], seed=0)
  prefix = tok.encode("Question: a b\nReasoning:")
  full = tok.encode("Question: a b\nReasoning: x 1\nAnswer: 1") + [tok.eos_id]
  cont = full[len(prefix) :]
  assert full[: len(prefix)] == prefix
  n = len(full) - 1
  assert lm.inputs[0, :n].tolist() == full[:-1]
  assert lm.targets[0, :n].tolist() == full[1:]
  expected = [0.1] * (len(prefix) - 1) + [1.0] * len(cont)
  np.testing.assert_allclose(lm.target_weights[0, :n], expected)
  assert not lm.target_mask[0, n:].any() and not lm.target_mask[3].any()
  assert lm.inputs.shape == (4, batcher.seq_len) and batcher.seq_len % 16 == 0


def test_self_reflection_rows():
  tok, batcher = make_batcher()
  assert batcher.sr_candidates == 2  # q2 has a single rationale: no positive besides the anchor
  lm, reflection = batcher.build([0, 1, 2], seed=0)
  assert reflection.sr_mask.tolist() == [1.0, 1.0, 0.0, 0.0]
  decode = lambda row, k: tok.decode(
      reflection.continuations[row, k][reflection.continuation_mask[row, k]]
  )
  assert (decode(0, 0), decode(0, 1), decode(0, 2)) == (
      " x 1\nAnswer: 1",
      " y 1\nAnswer: 1",
      " x 2\nAnswer: 2",
  )
  assert (decode(1, 0), decode(1, 1)) == (" y 1\nAnswer: 1", " x 1\nAnswer: 1")
  prefix = reflection.prefix[0][reflection.prefix_mask[0]].tolist()
  assert prefix == tok.encode("Question: a b\nReasoning:")
  assert reflection.prefix_mask[0, -1]  # left-padded


def test_self_reflection_sub_batch():
  _, batcher = make_batcher(sr_batch_size=1)
  lm, reflection = batcher.build([0, 1, 2], seed=5)
  assert reflection.sr_mask.tolist() == [1.0]
  assert reflection.prefix.shape[0] == 1 and lm.inputs.shape[0] == 4


def test_training_ids_are_the_whole_string_tokenised_once():
  """A SentencePiece-style tokenizer (LLaMA 2's: '▁' prepended to the text, spaces as '▁')
  tokenises a continuation differently alone than after its prefix; the trainer must use the
  joint ids."""
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
  from tailored_jax.data.tokenizer import Tokenizer

  backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  backend.normalizer = normalizers.Sequence(
      [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
  )
  backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
  backend.decoder = decoders.Sequence(
      [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
  )
  corpus = ["Question: a b\nReasoning: x 1\nAnswer: 1", "Question: c\nReasoning: y 2"] * 4
  backend.train_from_iterator(
      corpus,
      trainers.BpeTrainer(
          vocab_size=120, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], show_progress=False
      ),
  )
  tok = Tokenizer(backend)
  text = "Question: a b\nReasoning: x 1\nAnswer: 1"
  at = text.index(" x")
  assert tok.encode(text[:at]) + tok.encode(text[at:]) != tok.encode(text)
  batcher = batching.Batcher(
      tok,
      {"q1": text[:at]},
      [batching.TrainExample("q1", text[at:])],
      {},
      batch_size=1,
      max_seq_len=64,
      max_continuation_len=32,
      prefix_weight=0.1,
      max_positives=10,
      max_negatives=4,
  )
  lm, _ = batcher.build([0], seed=0)
  full = tok.encode(text) + [tok.eos_id]
  n = len(full) - 1
  assert lm.inputs[0, :n].tolist() == full[:-1]
  assert lm.targets[0, :n].tolist() == full[1:]
  ids, split = tok.encode_split([text], [at])[0]
  assert tok.decode(ids[:split]) == text[:at] and split == len(tok.encode(text[:at]))
  np.testing.assert_allclose(
      lm.target_weights[0, :n], [0.1] * (split - 1) + [1.0] * (n - split + 1)
  )


def test_positive_candidates_are_drawn_at_random_beyond_the_first_ten():
  """METHOD §3: at most 10 positives per anchor, drawn at random (seeded), not the first 10."""
  tok = train_bpe(["Question: a\nReasoning: r 1 2 3 4 5 6 7 8 9\nAnswer: 1"] * 4, 280)
  examples = [batching.TrainExample("q1", f" r {i}\nAnswer: 1") for i in range(15)]

  def make(seed):
    return batching.Batcher(
        tok,
        {"q1": "Question: a\nReasoning:"},
        examples,
        {"q1": [" w\nAnswer: 2"]},
        batch_size=1,
        max_seq_len=64,
        max_continuation_len=32,
        prefix_weight=0.1,
        max_positives=10,
        max_negatives=4,
        seed=seed,
    )

  batcher = make(0)
  assert all(len(p) == 10 for p in batcher.positives_of)
  assert any(j > 10 for j in batcher.positives_of[0])  # the first 10 others are 1..10
  assert batcher.positives_of == make(0).positives_of
  assert batcher.positives_of != make(1).positives_of
  used = set()
  for seed in range(40):
    _, reflection = batcher.build([0], seed=seed)
    row = reflection.continuations[0, 1][reflection.continuation_mask[0, 1]]
    used.add(tok.decode(row))
  assert used == {f" r {j}\nAnswer: 1" for j in batcher.positives_of[0]}


def test_length_buckets_pad_each_batch_to_its_own_longest_string():
  tok, whole = make_batcher()
  _, bucketed = make_batcher()
  bucketed.length_bucket = 4
  lengths = [len(ids) - 1 for ids, _ in whole.sequences]  # LM positions per string
  for indices in ([0], [2], [0, 1], [0, 1, 2]):
    lm, _ = bucketed.build(indices, seed=0)
    longest = max(lengths[i] for i in indices)
    assert lm.inputs.shape == (4, -(-longest // 4) * 4)
    reference, _ = whole.build(indices, seed=0)  # the same tokens, only less padding
    for field in ("inputs", "targets", "input_mask", "target_mask", "target_weights"):
      np.testing.assert_array_equal(
          getattr(lm, field), getattr(reference, field)[:, : lm.inputs.shape[1]]
      )
      assert not getattr(reference, field)[:, lm.inputs.shape[1] :].any()
  batches = [[0], [2], [1]]
  share, shapes = bucketed.padding(batches)
  widths = [-(-lengths[i] // 4) * 4 for i in (0, 2, 1)]
  assert share == pytest.approx(1 - sum(lengths) / (4 * sum(widths)))
  assert shapes == len(set(widths))
  whole_share, whole_shapes = whole.padding(batches)
  assert whole_shapes == 1 and whole_share == pytest.approx(
      1 - sum(lengths) / (4 * 3 * whole.seq_len)
  )
  assert share < whole_share


def test_length_grouped_epochs_keep_every_example_once_in_distinct_question_batches():
  rng = np.random.default_rng(0)
  qids = [f"q{i % 37}" for i in range(300)]  # up to 9 rationales per question
  lengths = rng.integers(100, 700, len(qids)).tolist()
  batches = batching.epoch_order(qids, 8, seed=3, lengths=lengths, window_batches=4)
  assert sorted(i for b in batches for i in b) == list(range(300))
  assert all(len({qids[i] for i in b}) == len(b) for b in batches)
  assert sum(len(b) < 8 for b in batches) <= 2  # only the end of the epoch is short
  assert batches == batching.epoch_order(qids, 8, seed=3, lengths=lengths, window_batches=4)
  padded = lambda bs: sum(8 * max(lengths[i] for i in b) for b in bs)
  plain = batching.epoch_order(qids, 8, seed=3)
  assert padded(batches) < 0.8 * padded(plain)
  longest = [max(lengths[i] for i in b) for b in batches]
  assert longest != sorted(longest)  # similar lengths together, batches in random order
  spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
  assert np.median(spans) < 0.5 * np.median(
      [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain]
  )
