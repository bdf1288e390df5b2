"""`gsm8k_smollm2_human.py` with two more rounds: the student's exam mistakes are answered by the
human-rationale teacher (the reference solution again, not tailored feedback), so the pair
measures what exam-driven rounds add over plain distillation when the teacher cannot tailor."""

import os

from tailored_jax import config_lib


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.from_file(os.path.join(here, "gsm8k_smollm2_human.py"))
  c.rounds = 3
  return c
