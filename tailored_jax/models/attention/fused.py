"""The training attention as one `jax.nn.dot_product_attention` call: its XLA form ('xla', the
[batch, heads, tokens, keys] scores materialised) or cuDNN's fused flash kernel on GPU
('cudnn'), chosen by `dispatch`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tailored_jax.models.annotations import tag, tag_all
from tailored_jax.models.attention.contexts import ContextKV
from tailored_jax.models.attention.names import FUSED_NAMES


def fused_inputs(q_btnh, k_btkh, v_btkh, dtype):
  """The fused kernel's query, key and value in the compute dtype, named for the remat policy."""
  return tag_all((x.astype(dtype) for x in (q_btnh, k_btkh, v_btkh)), FUSED_NAMES)


def fused_causal_attention(
    q_btnh, k_btkh, v_btkh, valid_bt, dtype, window: int = 0, implementation="xla"
):
  """Causal grouped-query self-attention with padding keys masked (and keys more than `window`
  back, with a sliding window)."""
  q_btnh, k_btkh, v_btkh = fused_inputs(q_btnh, k_btkh, v_btkh, dtype)
  return tag(
      jax.nn.dot_product_attention(
          q_btnh,
          k_btkh,
          v_btkh,
          mask=valid_bt[:, None, None, :],
          is_causal=True,
          local_window_size=(window - 1, 0) if window else None,
          implementation=implementation,
      ),
      FUSED_NAMES[3],
  )


def fused_context_attention(
    q_btnh, k_btkh, v_btkh, valid_bt, kv: ContextKV, dtype, window: int = 0, implementation="xla"
):
  """Rows after a read-only context as one `jax.nn.dot_product_attention` over the context's
  keys (repeated for each row of a group) and the rows' own, under one explicit mask."""
  b, t = valid_bt.shape
  q_btnh, k_btkh, v_btkh = fused_inputs(q_btnh, k_btkh, v_btkh, dtype)
  per_row = lambda x_gksh: jnp.swapaxes(jnp.repeat(x_gksh, b // x_gksh.shape[0], axis=0), 1, 2)
  k_bskh = jnp.concatenate([per_row(kv.k_gksh).astype(dtype), k_btkh], axis=1)
  v_bskh = jnp.concatenate([per_row(kv.v_gksh).astype(dtype), v_btkh], axis=1)
  pos = jnp.arange(t)
  seen_tt = pos[None, :] <= pos[:, None]
  if window:
    seen_tt &= pos[None, :] > pos[:, None] - window
  mask_bts = jnp.concatenate([kv.mask_bts, seen_tt[None] & valid_bt[:, None, :]], axis=2)
  return tag(
      jax.nn.dot_product_attention(
          q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None], implementation=implementation
      ),
      FUSED_NAMES[3],
  )
