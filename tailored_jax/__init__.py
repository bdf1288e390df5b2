"""tailored_jax: Tailored Learning (chain-of-thought distillation from a black-box teacher) in JAX.

XLA:CPU's default copy insertion copies every stacked weight that a layer scan reads when the
train state is donated (about 0.7 GB for SmolLM2-135M); its region analysis does not. Set before
JAX starts its CPU backend; an explicit setting in XLA_FLAGS wins.
"""
import os

_REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis"
if _REGION_ANALYSIS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_REGION_ANALYSIS}=true".strip()
