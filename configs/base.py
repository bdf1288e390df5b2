"""The paper's GPT-J-6B hyper-parameters (METHOD §4) on the synthetic task; see config_lib for
every field. Experiment files import this and override."""

from tailored_jax.config_lib import base_config


def get_config():
  return base_config()
