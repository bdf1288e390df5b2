"""The answer-only baseline of the quickstart (the paper compares with it): fine-tuning on
question -> gold answer, no rationale and no teacher; the same student, steps and evaluation.
"""

import os

from tailored_jax import config_lib


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.from_file(os.path.join(here, "quickstart.py"))
  c.task.format = "answer_only"
  c.method.feedback = False
  c.method.self_reflection = False
  return c
