"""`python -m tailored_jax.generate --model=SRC --prompt="..." [--max-new-tokens N]
[--greedy | --temperature T] [--json]`: try a student (HF dir, GGUF file or round checkpoint)."""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags

from tailored_jax.models import for_devices
from tailored_jax.student_io.student import load_student
from tailored_jax.sample.decode import Decoder, StopTables
from tailored_jax.sample.sampling import SamplingConfig

_MODEL = flags.DEFINE_string("model", None, "HF directory, .gguf file or round checkpoint")
_PROMPT = flags.DEFINE_string("prompt", None, "the prompt text")
_MAX_NEW = flags.DEFINE_integer("max-new-tokens", 64, "tokens to generate at most")
_GREEDY = flags.DEFINE_bool("greedy", False, "greedy decoding (the default at temperature 0)")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature; 0 is greedy")
_TOP_K = flags.DEFINE_integer("top-k", 0, "top-k filter (0: off)")
_TOP_P = flags.DEFINE_float("top-p", 1.0, "top-p filter (1: off)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_JSON = flags.DEFINE_bool("json", False, "print token ids and text as JSON")


def generate(
    student, prompt: str, max_new_tokens: int, sampling: SamplingConfig, seed: int = 0
) -> tuple[list[int], str]:
  tok = student.tokenizer
  ids = tok.encode(prompt)
  tables = StopTables.from_tokenizer(tok, student.model.cfg.vocab_size, blank_line=False)
  # Plain generation, as transformers does it: only ids past the tokenizer are banned.
  tables = tables.replace(
      never_v=np.arange(len(tables.never_v)) >= tok.vocab_size,
      special_v=np.zeros_like(tables.special_v),
  )
  decoder = Decoder(for_devices(student.model, jax.devices()[:1]), tables)
  tokens = np.asarray([ids], np.int32)
  out, lengths = decoder(
      student.params,
      tokens,
      np.ones_like(tokens, bool),
      jax.random.PRNGKey(seed),
      max_new_tokens=max_new_tokens,
      num_samples=1,
      sampling=sampling,
  )
  new = np.asarray(out[0, : int(lengths[0])]).tolist()
  return new, tok.decode(new)


def main(argv):
  del argv
  if not _MODEL.value or _PROMPT.value is None:
    raise app.UsageError("--model and --prompt are required")
  temperature = 0.0 if _GREEDY.value else _TEMPERATURE.value
  student = load_student(_MODEL.value)
  ids, text = generate(
      student,
      _PROMPT.value,
      _MAX_NEW.value,
      SamplingConfig(temperature, _TOP_K.value, _TOP_P.value),
      _SEED.value,
  )
  print(
      json.dumps({"prompt": _PROMPT.value, "token_ids": ids, "text": text}) if _JSON.value else text
  )


if __name__ == "__main__":
  app.run(main)
