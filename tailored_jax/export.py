"""`python -m tailored_jax.export --checkpoint=SRC --out=DIR`: write a Hugging Face directory.

SRC is a round checkpoint (`WORKDIR/checkpoints/round_R`), an HF directory or a GGUF file. DIR
gets config.json, model.safetensors (float32) and the tokenizer files, loadable with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and servable by vLLM.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from tailored_jax.student_io import hf_io
from tailored_jax.student_io.student import load_student
from tailored_jax.train.step import all_finite
from tailored_jax.train.trainer import NonFiniteError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "round checkpoint, HF dir or .gguf")
_OUT = flags.DEFINE_string("out", None, "output directory")


def export(src: str, out: str) -> None:
  student = load_student(src)
  if not bool(all_finite(student.params)):
    raise NonFiniteError(f"{src}: the weights hold NaN or infinite values; not exported")
  tok = student.tokenizer
  hf_io.save_hf_dir(
      out,
      jax.device_get(student.params),
      student.model.cfg,
      student.model_type,
      bos_id=tok.bos_id,
      eos_id=tok.eos_id,
  )
  # tokenizer.json's post-processor carries which special tokens start and end a sequence;
  # transformers applies it as it is, so the exported model sees the ids training used.
  tok.backend.save(os.path.join(out, "tokenizer.json"))
  name = lambda i: tok.backend.id_to_token(i)
  prefix, suffix = tok.special_affixes()
  settings = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": name(tok.bos_id),
      "eos_token": name(tok.eos_id),
      "pad_token": name(tok.pad_id),
      "add_bos_token": tok.bos_id in prefix,
      "add_eos_token": tok.eos_id in suffix,
      "model_max_length": 32768,
  }
  if student.chat_template:
    settings["chat_template"] = student.chat_template
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(settings, f, indent=2)
  with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump(
        {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id},
        f,
        indent=2,
    )


def main(argv):
  del argv
  if not _CHECKPOINT.value or not _OUT.value:
    raise app.UsageError("--checkpoint and --out are required")
  export(_CHECKPOINT.value, _OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
