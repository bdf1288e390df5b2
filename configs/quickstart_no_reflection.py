"""Ablation of the quickstart: tailored feedback rounds without the self-reflection loss."""

import os

from tailored_jax import config_lib


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.from_file(os.path.join(here, "quickstart.py"))
  c.method.self_reflection = False
  return c
