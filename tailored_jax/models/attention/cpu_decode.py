"""One-token decode attention on CPU as a native kernel (`cpu_decode.cc`, built and registered
with the training kernel by `cpu_native`): each (row, kv head) reads the slots its mask keeps in
place, where the XLA form (`cached.attend_span`) copies every 32-slot chunk of the cache out
before its small batched matmuls; that was half of SmolLM2's decode step at 64 slots. A row's
numbers depend only on its kept keys and values, so static and continuous batching still
compute the same tokens. 8-float vectors: AVX2 and AVX-512 alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax.models.attention import cpu_native
from tailored_jax.models.kv_cache import Int8Buffer

MAX_QUERIES = 16  # query heads per kv head the kernel takes
# Rows reading one key table above which the XLA form's one matmul over them wins (a few-shot
# prefix all rows read); the kernel reads a table once per row.
MAX_ROWS_PER_TABLE = 8


def usable(q_bkxh, k_gksh) -> bool:
  """Whether a decode step's part can run the kernel: float32 queries (the compute dtype) and keys
  (not an int8 or bf16 cache), head_dim a multiple of 8, at most 16 query heads per kv head, at
  most `MAX_ROWS_PER_TABLE` rows reading each key table, and the kernel builds here (the step
  compiling for one CPU device is `dispatch.native_decode`'s)."""
  return (
      not isinstance(k_gksh, Int8Buffer)
      and q_bkxh.shape[0] // k_gksh.shape[0] <= MAX_ROWS_PER_TABLE
      and q_bkxh.dtype == jnp.float32
      and k_gksh.dtype == jnp.float32
      and q_bkxh.shape[-1] % 8 == 0
      and q_bkxh.shape[2] <= MAX_QUERIES
      and cpu_native.available()
  )


def part(q_bkxh, k_gksh, v_gksh, mask_bs, scale: float):
  """(max [b, k, x], sum [b, k, x], out [b, k, x, h]): `cached.attend_part`'s softmax part of
  one-token rows over keys shared by groups of consecutive rows, for the slots `mask_bs` keeps."""
  b, k, x, h = q_bkxh.shape
  shapes = (
      jax.ShapeDtypeStruct((b, k, x), jnp.float32),
      jax.ShapeDtypeStruct((b, k, x), jnp.float32),
      jax.ShapeDtypeStruct((b, k, x, h), jnp.float32),
  )
  return jax.ffi.ffi_call(cpu_native.DECODE_PART, shapes, vmap_method="sequential")(
      q_bkxh, k_gksh, v_gksh, mask_bs.astype(bool), scale=np.float32(scale)
  )
