"""Which training attention a step runs, chosen once from the config (`model.attention`) and the
devices the step compiles for (never the process's default backend while tracing), and the
per-layer `attend` that runs it.

'cpu_native' the native CPU kernel (`cpu_native`; float32), 'cpu_blockwise' the blockwise XLA
form (`blockwise`), 'xla' and 'cudnn' one `jax.nn.dot_product_attention` call (`fused`),
'splash' the Pallas TPU kernel (`splash`). 'auto' picks per platform: CPU the native kernel
where it builds for AVX-512 and the compute dtype is float32, else the blockwise form; GPU
cuDNN's flash kernel where it takes the dtype and head size, else XLA; TPU splash. A model
config not yet resolved for devices ('auto' at trace time: initialising parameters, shape
evaluation, tests of the network alone) runs the portable XLA form.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
from absl import logging

from tailored_jax.config_lib import ATTENTION, ConfigError
from tailored_jax.models.annotations import constrain
from tailored_jax.models.attention import blockwise, cpu_native, fused, splash
from tailored_jax.models.attention.cached import LayerKV, cached_attention
from tailored_jax.models.attention.contexts import ContextKV, KeptKV

REQUESTS = ATTENTION  # model.attention
PLATFORMS = {
    "xla": ("cpu", "gpu", "tpu"),
    "cudnn": ("gpu",),
    "splash": ("tpu",),
    "cpu_native": ("cpu",),
    "cpu_blockwise": ("cpu", "gpu", "tpu"),
}
# Not a config choice: the splash kernel run by Pallas's interpreter, for its values on CPU.
SPLASH_INTERPRET = "splash_interpret"


class AttentionError(ConfigError):
  """`model.attention` cannot run on the devices the step compiles for (a config error: the
  run stops with one line naming the field)."""


class Choice(NamedTuple):
  implementation: str
  reason: str


def _cudnn_head_limit(devices) -> int:
  """cuDNN's flash kernel takes head sizes up to 256 on Hopper and newer, 128 before."""
  capability = getattr(devices[0], "compute_capability", "") or "0"
  return 256 if float(capability) >= 9.0 else 128


def choose(requested: str, devices, dtype: str, head_dim: int) -> Choice:
  """The training attention for `devices` (those the step compiles for), with why."""
  if requested not in REQUESTS:
    raise AttentionError(
        f"config field model.attention: {requested!r} is not one of {list(REQUESTS)}"
    )
  platform = devices[0].platform
  if requested != "auto":
    if platform not in PLATFORMS[requested]:
      raise AttentionError(
          f"config field model.attention: {requested!r} runs on {'/'.join(PLATFORMS[requested])}"
          f" devices; this step compiles for {platform} ({devices[0].device_kind})"
      )
    if requested == "cpu_native" and not cpu_native.usable(dtype):
      return Choice("cpu_blockwise", _native_refusal(dtype))
    return Choice(requested, "asked for by model.attention")
  if platform == "cpu":
    if cpu_native.usable(dtype) and cpu_native.fast_here():
      return Choice(
          "cpu_native", "CPU devices, float32 compute, the native kernel builds here for AVX-512"
      )
    return Choice("cpu_blockwise", "CPU devices; " + _native_refusal(dtype))
  if platform == "gpu":
    limit = _cudnn_head_limit(devices)
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      return Choice("xla", f"GPU devices; cuDNN flash attention takes bf16/fp16, not {dtype}")
    if head_dim > limit or head_dim % 8:
      return Choice(
          "xla", f"GPU devices; cuDNN flash attention takes head sizes <= {limit}, x8: {head_dim}"
      )
    return Choice("cudnn", f"GPU devices ({devices[0].device_kind}), {dtype}, head size {head_dim}")
  if platform == "tpu":
    return Choice("splash", f"TPU devices ({devices[0].device_kind}): the Pallas splash kernel")
  return Choice("xla", f"{platform} devices: the XLA form")


def _native_refusal(dtype) -> str:
  if jnp.dtype(dtype) != jnp.float32:
    return f"the native kernel computes in float32, not {dtype}: the blockwise XLA form"
  if not cpu_native.available():
    return f"the native kernel does not build here ({cpu_native.why()}): the blockwise XLA form"
  if not cpu_native.wide_vectors():
    return (
        "the native kernel computes in 512-bit vectors and this CPU's compiler targets narrower "
        "ones (no AVX-512), where the blockwise XLA form is faster"
    )
  return "another process of this run lacks AVX-512: the blockwise XLA form on every process"


_logged: set = set()


def resolve(cfg, devices):
  """`cfg` (a model config) with `attention`, `platform` and `devices` set for `devices`; a resolved
  config is returned as it is. Logs the choice once."""
  if cfg.platform:
    return cfg
  choice = choose(cfg.attention, devices, cfg.dtype, cfg.head_dim)
  key = (cfg.attention, choice)
  if key not in _logged:
    _logged.add(key)
    logging.info("training attention: %s (%s)", choice.implementation, choice.reason)
  return dataclasses.replace(
      cfg, attention=choice.implementation, platform=devices[0].platform, devices=len(devices)
  )


def native_decode(cfg) -> bool:
  """Whether a resolved config's one-token decode steps read the cache with the native CPU kernel
  (`cpu_decode`, where it takes the step's dtypes and shapes): one CPU device. XLA cannot split
  a custom call over a mesh (it would gather every row's cache to each device), so a step over
  several devices takes the XLA form."""
  return cfg.platform == "cpu" and cfg.devices == 1


def uses_kernel(cfg) -> bool:
  """Whether a resolved model config's training attention is a fused kernel that keeps no
  scores in XLA's buffers (native CPU, splash, cuDNN; rows after a context with a sliding
  window still take the XLA forms), as the memory planner counts it."""
  if cfg.attention == "cpu_native":
    return cpu_native.usable(cfg.dtype)
  return cfg.attention in ("splash", SPLASH_INTERPRET, "cudnn")


def _unknown(implementation: str):
  return AttentionError(
      f"model.attention: {implementation!r} is not one of {list(REQUESTS) + [SPLASH_INTERPRET]}"
  )


def causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window: int, implementation: str):
  """Self-attention over the tokens themselves (training): causal, keys at padding masked,
  grouped-query, by the resolved `implementation`."""
  if implementation == "cpu_native" and cpu_native.usable(dtype):
    return cpu_native.causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, window).astype(dtype)
  if implementation in ("cpu_native", "cpu_blockwise"):
    return blockwise.blockwise_causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window)
  if implementation in ("xla", "cudnn", "auto"):
    return fused.fused_causal_attention(
        q_btnh,
        k_btkh,
        v_btkh,
        valid_bt,
        dtype,
        window,
        "cudnn" if implementation == "cudnn" else "xla",
    )
  if implementation in ("splash", SPLASH_INTERPRET):
    return splash.causal_attention(
        q_btnh, k_btkh, v_btkh, valid_bt, dtype, window, implementation == SPLASH_INTERPRET
    )
  raise _unknown(implementation)


def context_attention(
    q_btnh, k_btkh, v_btkh, valid_bt, kv: ContextKV, dtype, window: int, implementation: str
):
  """Training rows after a read-only context, by the resolved `implementation`; with a sliding
  window the kernels that take no context window (native, splash) give way to the blockwise
  form (CPU) or XLA (TPU)."""
  if implementation == "cpu_native" and not window and cpu_native.usable(dtype):
    return cpu_native.context_attention(q_btnh, k_btkh, v_btkh, valid_bt, kv).astype(dtype)
  if implementation in ("cpu_native", "cpu_blockwise"):
    return blockwise.blockwise_context_attention(
        q_btnh, k_btkh, v_btkh, valid_bt, kv, dtype, window
    )
  if implementation in ("splash", SPLASH_INTERPRET) and not window:
    return splash.context_attention(
        q_btnh, k_btkh, v_btkh, valid_bt, kv, dtype, implementation == SPLASH_INTERPRET
    )
  if implementation in ("xla", "cudnn", "splash", SPLASH_INTERPRET, "auto"):
    cudnn = implementation == "cudnn" and q_btnh.shape[1] % 2 == 0
    return fused.fused_context_attention(
        q_btnh, k_btkh, v_btkh, valid_bt, kv, dtype, window, "cudnn" if cudnn else "xla"
    )
  raise _unknown(implementation)


def attend(
    q_btnh,
    k_btkh,
    v_btkh,
    valid_bt,
    kv: LayerKV | KeptKV | ContextKV | None,
    dtype,
    window: int = 0,
    implementation: str = "auto",
    native_decode: bool = False,
):
  """Attention for one layer: with the cache's `kv`, the new keys and values are written into it
  (`cached_attention`); without one (training), tokens attend causally to themselves (`valid_bt`
  masks padding) by the resolved `implementation`, and nothing is stored but, with a `KeptKV`,
  its first tokens' keys and values; with a `ContextKV` (training) they also see its read-only
  context. `native_decode`: one-token steps read the cache with the native CPU kernel
  (`native_decode(cfg)`). Returns (out, kv)."""
  q_btnh = constrain(q_btnh, ("batch", "length", "heads", "head_dim"))
  k_btkh = constrain(k_btkh, ("batch", "length", "kv_heads", "head_dim"))
  v_btkh = constrain(v_btkh, ("batch", "length", "kv_heads", "head_dim"))
  if isinstance(kv, ContextKV):
    out_btnh = context_attention(
        q_btnh, k_btkh, v_btkh, valid_bt, kv, dtype, window, implementation
    )
  elif kv is None or isinstance(kv, KeptKV):
    out_btnh = causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, dtype, window, implementation)
    if kv is not None:
      first = lambda x_btkh: jnp.swapaxes(x_btkh[:, : kv.length], 1, 2).astype(dtype)
      kv = kv.replace(k_bksh=first(k_btkh), v_bksh=first(v_btkh))
  else:
    out_btnh, kv = cached_attention(q_btnh, k_btkh, v_btkh, kv, dtype, native=native_decode)
  out_btnh = constrain(out_btnh, ("batch", "length", "heads", "head_dim"))
  return out_btnh, kv
