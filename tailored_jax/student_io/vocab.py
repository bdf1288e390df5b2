"""A pad token for vocabularies without one (GPT-2 BPE, as GPT-J uses), added as the release did,
with its embedding and LM-head rows set to the mean of the existing rows (METHOD §4)."""

from __future__ import annotations

import numpy as np
import tokenizers

from tailored_jax.data.tokenizer import Tokenizer

PAD_TOKEN = "<|pad|>"


def needs_pad(tokenizer: Tokenizer) -> bool:
  return tokenizer.pad_id == tokenizer.eos_id


def add_pad_token(tokenizer: Tokenizer) -> Tokenizer:
  """A copy of the tokenizer with PAD_TOKEN added as a special token and used as its pad id."""
  tok = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
  tok.add_special_tokens([PAD_TOKEN])
  return Tokenizer(tok, tokenizer.bos_id, tokenizer.eos_id, tok.token_to_id(PAD_TOKEN))


# The vocabulary axis of each parameter that has one.
VOCAB_AXIS = {("embedding",): 0, ("lm_head",): 1, ("lm_head_bias",): 0}


def with_mean_row(matrix: np.ndarray, axis: int, pad_id: int, old_vocab: int) -> np.ndarray:
  """`matrix` whose entry `pad_id` along `axis` is the mean of entries [0, old_vocab); entries
  are appended when `pad_id` is past the end."""
  matrix = np.asarray(matrix)
  mean = np.take(matrix, np.arange(old_vocab), axis=axis).mean(axis=axis, keepdims=True)
  missing = pad_id + 1 - matrix.shape[axis]
  if missing > 0:
    return np.concatenate([matrix] + [mean.astype(matrix.dtype)] * missing, axis=axis)
  matrix = matrix.copy()
  index = [slice(None)] * matrix.ndim
  index[axis] = slice(pad_id, pad_id + 1)
  matrix[tuple(index)] = mean
  return matrix
