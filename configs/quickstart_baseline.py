"""The honest ablation of the quickstart: plain distillation.

One round of teacher rationales, no feedback and no self-reflection. Its teacher budget is at
least the tailored run's (26 rationales per question: more teacher tokens than the tailored
run's annotation plus feedback, measured) and it takes about as many optimizer steps as the
tailored run takes over all its rounds.
"""

import os

from tailored_jax import config_lib


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.from_file(os.path.join(here, "quickstart.py"))
  c.rounds = 1
  c.method.feedback = False
  c.method.self_reflection = False
  c.teacher.num_rationales = 26
  c.train.epochs = 2
  return c
