"""A frozen base stored quantised (QLoRA, Dettmers et al., 2023): each projection weight as
int8 or NF4 codes with a float32 absmax scale per block of 64 (or fewer) along its last input
axis, dequantised inside its layer in the compute dtype. NF4 codes are packed two per byte
along the last output axis.

A quantised weight is the dict {"codes", "scale"} in place of the array, each with its logical
axes (the scale's block axis unsharded), so it shards, scans and checkpoints like any other.

Hand-written rather than qwix's quantisation: qwix tiles and packs into its own QArray layout
for the weights its interception finds (none of ours; see `lora.py`), and the few lines here
keep our multi-axis weights' logical axes.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax.models.layers import LAYERS, param

KINDS = ("int8", "nf4")
BLOCK = 64
# NF4: the 16 quantiles of N(0, 1) scaled to [-1, 1] (QLoRA's table, as bitsandbytes ships it)
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# the weights a quantised base stores as codes, with how many leading axes are the input
INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
INPUT_AXES.update(w_in=1, w_out=1)  # GPT-J's MLP


def block(in_last: int) -> int:
  return math.gcd(BLOCK, in_last)


def quantize(w, n_in: int, kind: str, xp=np) -> dict:
  """{"codes", "scale"} of a weight [in..., out...] (numpy on the host, or `xp=jnp`)."""
  shape = w.shape
  in_last, lead = shape[n_in - 1], shape[: n_in - 1]
  b = block(in_last)
  blocks = xp.asarray(w, xp.float32).reshape(*lead, in_last // b, b, *shape[n_in:])
  absmax = xp.max(xp.abs(blocks), axis=n_in)
  if kind == "int8":
    scale = xp.where(absmax > 0, absmax / 127.0, 1.0)
    codes = xp.clip(xp.round(blocks / xp.expand_dims(scale, n_in)), -127, 127).astype(xp.int8)
    return {"codes": codes.reshape(shape), "scale": scale.astype(xp.float32)}
  if kind != "nf4":
    raise ValueError(f"model.base_quantization: {kind!r} is not one of none, {', '.join(KINDS)}")
  scale = xp.where(absmax > 0, absmax, 1.0)
  normal = blocks / xp.expand_dims(scale, n_in)
  codes = xp.argmin(xp.abs(normal[..., None] - xp.asarray(NF4)), axis=-1).astype(xp.uint8)
  codes = codes.reshape(shape)
  packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
  return {"codes": packed.astype(xp.uint8), "scale": scale.astype(xp.float32)}


def dequantize(q: dict, n_in: int, kind: str, dtype) -> jax.Array:
  """The weight [in..., out...] a quantised dict stands for, in `dtype`."""
  codes, scale = q["codes"], q["scale"]
  if kind == "nf4":
    pairs = jnp.stack([codes & 0xF, codes >> 4], axis=-1)
    values = jnp.asarray(NF4)[pairs.reshape(*codes.shape[:-1], -1).astype(jnp.int32)]
  else:
    values = codes.astype(jnp.float32)
  shape = values.shape
  b = block(shape[n_in - 1])
  blocks = values.reshape(*shape[: n_in - 1], shape[n_in - 1] // b, b, *shape[n_in:])
  return (blocks * jnp.expand_dims(scale, n_in)).reshape(shape).astype(dtype)


def weight(module: nn.Module, name: str, shape: tuple, axes: tuple, init, cfg):
  """A projection weight [in..., out...]: the parameter array, or with `base_quantization` its
  quantised dict (initialised by quantising `init`'s float draw), dequantised here."""
  kind = cfg.base_quantization
  if kind == "none":
    return param(module, name, shape, axes, jnp.dtype(cfg.param_dtype), init)
  n_in = INPUT_AXES[name]
  scale_axes = (*axes[: n_in - 1], None, *axes[n_in:])

  def init_quantized(key):
    q = quantize(init(key, shape, jnp.float32), n_in, kind, xp=jnp)
    return {
        "codes": nn.LogicallyPartitioned(q["codes"], axes),
        "scale": nn.LogicallyPartitioned(q["scale"], scale_axes),
    }

  return dequantize(module.param(name, init_quantized), n_in, kind, jnp.dtype(cfg.dtype))


def is_quantized(value) -> bool:
  return isinstance(value, dict) and set(value) == {"codes", "scale"}


def dequantized(params: dict, kind: str, dtype, stacked: bool = False) -> dict:
  """The tree with every quantised weight replaced by its float array in `dtype` (a scanned
  model's stacked weights dequantised layer by layer)."""
  out = {}
  for k, v in params.items():
    if is_quantized(v):
      one = lambda q, n_in=INPUT_AXES[k]: dequantize(q, n_in, kind, dtype)
      out[k] = jax.vmap(one)(v) if stacked else one(v)
    elif isinstance(v, dict):
      out[k] = dequantized(v, kind, dtype, stacked or k == LAYERS)
    else:
      out[k] = v
  return out
