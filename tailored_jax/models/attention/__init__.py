"""Attention, one module per job: `dispatch` (the training attention chosen once per step's
devices, and the per-layer `attend`), `cached` (prefill and decoding over the KV cache),
`masks`, `contexts` (what training rows read besides their own tokens), the training forms
`blockwise` (XLA), `fused` (`jax.nn.dot_product_attention`: XLA or cuDNN), `splash` (Pallas
TPU), `cpu_native` (the native CPU kernel), and `shard` (a kernel per device under a mesh)."""
