"""`python -m tailored_jax.export --checkpoint=SRC --out=DIR`: write a Hugging Face directory.

SRC is a round checkpoint (`WORKDIR/checkpoints/round_R`), an HF directory or a GGUF file. DIR
gets config.json, model.safetensors (float32) and the tokenizer files, loadable with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and servable by vLLM (a LoRA
student's adapters merged in). With `--peft`, a LoRA student's adapters alone as a PEFT adapter
directory over its base model (`peft.PeftModel.from_pretrained(base, DIR)`).
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags

from tailored_jax.student_io import hf_io, peft_io
from tailored_jax.student_io.student import load_student
from tailored_jax.train.step import all_finite
from tailored_jax.train.trainer import NonFiniteError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "round checkpoint, HF dir or .gguf")
_OUT = flags.DEFINE_string("out", None, "output directory")
_PEFT = flags.DEFINE_bool(
    "peft", False, "a LoRA student's adapters alone, as a PEFT adapter directory"
)


def export_peft(src: str, out: str) -> None:
  """A LoRA round checkpoint's adapters as a PEFT directory over its base model (init_from)."""
  student = load_student(src)
  if student.adapted is None:
    raise ValueError(f"{src}: no LoRA adapters (model.lora_rank was 0); export without --peft")
  if not student.base_model:
    raise ValueError(
        f"{src}: the student was trained from scratch (model.init_from is empty): there is no "
        "base model for an adapter; export without --peft"
    )
  cfg, params = student.adapted
  if not bool(all_finite(params)):
    raise NonFiniteError(f"{src}: the weights hold NaN or infinite values; not exported")
  peft_io.save_peft_dir(out, jax.device_get(params), cfg, student.base_model)


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
  try:
    (export_peft if _PEFT.value else export)(_CHECKPOINT.value, _OUT.value)
  except (ValueError, hf_io.ModelImportError, NonFiniteError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
