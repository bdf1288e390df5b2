"""The quickstart's full method with DPO in place of the self-reflection triplet loss: the same
(correct rationale, the student's own wrong one) pairs, the same batches and weight λ, DPO's
reference model the round's starting weights (`method.reflection_loss=dpo`, β = 0.1)."""

import os

from tailored_jax import config_lib


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.from_file(os.path.join(here, "quickstart.py"))
  c.method.reflection_loss = "dpo"
  return c
