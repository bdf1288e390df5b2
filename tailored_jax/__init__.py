"""tailored_jax: Tailored Learning (chain-of-thought distillation from a black-box teacher)."""
