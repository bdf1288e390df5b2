"""The GSM8K pilot (`gsm8k_smollm2_human_rounds.py`: SmolLM2-135M-Instruct student, 200 training
questions, 3 rounds) with an open model as the teacher, decoded on the run's own devices
(`teacher.kind=open_model`): here SmolLM2-135M-Instruct itself, a weak teacher that keeps the
whole path (annotation, tailored feedback, rejection of wrong replies) offline end to end. Point
`teacher.model_path` at a stronger instruct model (an HF directory or a GGUF) for real use."""

import os

from tailored_jax import config_lib


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.from_file(os.path.join(here, "gsm8k_smollm2_human_rounds.py"))
  c.teacher.update(
      kind="open_model",
      model_path=c.model.init_from,
      num_rationales=4,
      temperature=0.7,
      max_tokens=256,
  )
  return c
