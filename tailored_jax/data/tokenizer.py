"""Tokenizers: a thin wrapper over HF `tokenizers`, and a local byte-level BPE trainer.

`encode` inserts exactly the special tokens the tokenizer's own post-processor inserts (as
transformers' `tokenizer(text)` does), so training, decoding and an exported model agree on ids.
The trained BPE splits digits one by one (as LLaMA's does) so numbers keep their place value,
starts every sequence with `<s>`, and decodes byte-exactly, so answer extraction reads what the
model wrote.
"""

from __future__ import annotations

import json

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tailored_jax import storage

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


class Tokenizer:
  """Encode/decode plus the ids and per-token tables the decoder and batchers need.

  `bos_id`/`eos_id`/`pad_id` default to the `<s>`, `</s>`, `<pad>` tokens; a pretrained model
  passes its own. They are saved beside tokenizer.json in special_tokens.json. Which special
  tokens start or end a sequence is the post-processor's business, never decided here.
  """

  def __init__(
      self,
      tok: tokenizers.Tokenizer,
      bos_id: int | None = None,
      eos_id: int | None = None,
      pad_id: int | None = None,
  ):
    self._tok = tok
    self.bos_id = self._require(BOS) if bos_id is None else bos_id
    self.eos_id = self._require(EOS) if eos_id is None else eos_id
    self.pad_id = self._require(PAD) if pad_id is None else pad_id
    self.vocab_size = tok.get_vocab_size()
    added = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    self.special_ids = sorted({self.pad_id, self.bos_id, self.eos_id, *added})

  def _require(self, token: str) -> int:
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise ValueError(f"tokenizer has no {token!r} token; name the special token ids")
    return token_id

  @property
  def backend(self) -> tokenizers.Tokenizer:
    return self._tok

  def special_affixes(self) -> tuple[list[int], list[int]]:
    """The special ids the post-processor puts before and after every single sequence."""
    return special_affixes(self._tok)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not storage.exists(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
      tok = tokenizers.Tokenizer.from_str(storage.read_text(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
    ids = {}
    sidecar = storage.join(storage.parent(path), "special_tokens.json")
    if storage.exists(sidecar):
      ids = json.loads(storage.read_text(sidecar))
    if ids.get("add_bos") and not special_affixes(tok)[0]:
      # Workdirs written before the post-processor carried the BOS rule.
      bos_id = ids.get("bos_id", tok.token_to_id(BOS))
      tok = with_special_affixes(tok, [bos_id], special_affixes(tok)[1])
    return cls(tok, ids.get("bos_id"), ids.get("eos_id"), ids.get("pad_id"))

  def save(self, path: str) -> None:
    storage.write_atomically(path, self._tok.to_str(pretty=True))
    storage.write_atomically(
        storage.join(storage.parent(path), "special_tokens.json"),
        json.dumps({"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}),
    )

  def encode(self, text: str) -> list[int]:
    """Ids of `text` with the tokenizer's own special tokens, as transformers encodes it."""
    return self._tok.encode(text).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts)]

  def encode_split(self, texts: list[str], split_at: list[int]) -> list[tuple[list[int], int]]:
    """Each text tokenised once, with the number of its tokens that lie before character
    `split_at[i]` (leading special tokens included; a token straddling the offset lies after).

    A training string is prefix ⊕ continuation: tokenising the whole and splitting it keeps the
    ids the model sees at inference, where encoding the parts apart could merge differently.
    """
    out = []
    for encoding, at in zip(self._tok.encode_batch(texts), split_at):
      split = len(encoding.ids)
      for i, ((_, end), special) in enumerate(zip(encoding.offsets, encoding.special_tokens_mask)):
        if not special and end > at:
          split = i
          break
      out.append((encoding.ids, split))
    return out

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def decode_batch(self, ids_batch) -> list[str]:
    return self._tok.decode_batch(
        [[int(i) for i in ids] for ids in ids_batch], skip_special_tokens=True
    )

  def newline_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token id: (text starts with '\\n', ends with '\\n', contains '\\n\\n').

    The decoder stops a sequence at a blank line, which may be one token or two.
    """
    starts = np.zeros(self.vocab_size, bool)
    ends = np.zeros(self.vocab_size, bool)
    blank = np.zeros(self.vocab_size, bool)
    for token_id in range(self.vocab_size):
      if token_id in self.special_ids:
        continue
      text = self._tok.decode([token_id], skip_special_tokens=False)
      starts[token_id] = text.startswith("\n")
      ends[token_id] = text.endswith("\n")
      blank[token_id] = "\n\n" in text
    return starts, ends, blank


def train_bpe(corpus: list[str], vocab_size: int) -> Tokenizer:
  """A byte-level BPE with single-digit tokens, trained on `corpus` (deterministic)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
          pre_tokenizers.Digits(individual_digits=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[PAD, BOS, EOS],
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(corpus, trainer=trainer)
  return Tokenizer(with_special_affixes(tok, [tok.token_to_id(BOS)], []))


_PROBE = "a"


def special_affixes(tok: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
  """(ids before, ids after) the content that `tok` adds to a single sequence."""
  encoding = tok.encode(_PROBE)
  special = encoding.special_tokens_mask
  content = [i for i, s in enumerate(special) if not s]
  if not content:
    return list(encoding.ids), []
  return list(encoding.ids[: content[0]]), list(encoding.ids[content[-1] + 1 :])


def with_special_affixes(
    tok: tokenizers.Tokenizer, prefix: list[int], suffix: list[int]
) -> tokenizers.Tokenizer:
  """A copy of `tok` whose post-processor puts `prefix` before and `suffix` after a sequence."""
  tok = tokenizers.Tokenizer.from_str(tok.to_str())
  names = [tok.id_to_token(i) for i in prefix + suffix]
  single = (
      [f"{t}:0" for t in names[: len(prefix)]] + ["$A:0"] + [f"{t}:0" for t in names[len(prefix) :]]
  )
  pair = single + ["$B:1"]
  tok.post_processor = processors.TemplateProcessing(
      single=single, pair=pair, special_tokens=sorted(set(zip(names, prefix + suffix)))
  )
  return tok
