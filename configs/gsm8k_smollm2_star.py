"""STaR on the SmolLM2-135M GSM8K pilot (`gsm8k_smollm2_human_rounds.py`'s student, data and
rounds), the paper's self-training baseline: no teacher; round 1 learns from the initial
student's own right exam samples, each later round from its last exam's, and questions it got
wrong from its answers when told the gold answer as a hint (rationalization, hint removed)."""

import os

from tailored_jax import config_lib


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.from_file(os.path.join(here, "gsm8k_smollm2_human_rounds.py"))
  c.teacher.kind = "self"
  c.method.self_reflection = False
  return c
