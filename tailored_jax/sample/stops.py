"""When a generated row ends: per-token tables over the vocabulary (EOS, blank lines, tokens never
generated) and the rule that reads them, shared by static and continuous batching."""

from __future__ import annotations

import flax.struct
import numpy as np


@flax.struct.dataclass
class StopTables:
  """Per-token facts the loop needs, as arrays over the vocabulary (a pytree: the arrays are
  traced, the ids static)."""

  starts_newline_v: np.ndarray
  ends_newline_v: np.ndarray
  blank_line_v: np.ndarray
  never_v: np.ndarray  # tokens never generated (pad, bos)
  special_v: np.ndarray  # tokens the first generated token may not be
  eos_id: int = flax.struct.field(pytree_node=False)
  pad_id: int = flax.struct.field(pytree_node=False)

  @classmethod
  def never_stop(cls, vocab_size: int, pad_id: int = 0) -> "StopTables":
    """Every row runs the full budget and any token may be drawn (parity tests, benchmarks)."""
    none = np.zeros(vocab_size, bool)
    return cls(none, none, none, none, none, eos_id=-1, pad_id=pad_id)

  @classmethod
  def from_tokenizer(
      cls, tok, vocab_size: int | None = None, blank_line: bool = True
  ) -> "StopTables":
    """Stops at EOS, and at a blank line unless `blank_line` is False. Tables span the model's
    `vocab_size` (embedding rows past the tokenizer's vocabulary are never generated)."""
    size = tok.vocab_size if vocab_size is None else vocab_size
    if size < tok.vocab_size:
      raise ValueError(
          f"model vocabulary ({size}) is smaller than the tokenizer's ({tok.vocab_size})"
      )
    starts, ends, blank = (np.zeros(size, bool) for _ in range(3))
    if blank_line:
      for table, values in zip((starts, ends, blank), tok.newline_tables()):
        table[: tok.vocab_size] = values
    never = np.zeros(size, bool)
    never[[tok.pad_id, tok.bos_id]] = True
    never[tok.vocab_size :] = True
    never[tok.eos_id] = False  # some models pad with their EOS
    special = np.zeros(size, bool)
    special[tok.special_ids] = True
    return cls(starts, ends, blank, never, special, tok.eos_id, tok.pad_id)


def stop_tokens(tables: StopTables, prev_n, token_n):
  """Whether each row's new token ends it: EOS, a blank-line token, or a newline after one."""
  return (
      (token_n == tables.eos_id)
      | tables.blank_line_v[token_n]
      | (tables.ends_newline_v[prev_n] & tables.starts_newline_v[token_n])
  )
