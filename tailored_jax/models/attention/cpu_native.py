"""The training step's causal self-attention on CPU as a native flash kernel (`cpu_native.cc`,
forward and backward, XLA's intra-op threads): XLA:CPU runs the blockwise form's small per-head
matmuls at a third of its matmul peak, and this kernel runs the whole attention about twice as
fast. Built with the decode step's kernel (`cpu_decode.cc`, see `cpu_decode`) into one library,
with the machine's C++ compiler on first use, into a cache directory
($TAILORED_JAX_CACHE, else ~/.cache/tailored_jax), keyed by the source, the flags, jaxlib, the
CPU and the compiler's target features; where that fails, `available()` is False (the reason
logged once) and the models use the blockwise XLA form (`attention.blockwise`),
which computes the same values.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from tailored_jax.models.annotations import tag_all
from tailored_jax.models.attention import shard
from tailored_jax.models.attention.contexts import ContextKV
from tailored_jax.models.attention.names import FLASH_INPUTS, FLASH_OUTPUTS

SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("cpu_native.cc", "cpu_decode.cc", "cpu_threads.h")
)
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-fPIC", "-shared", "-w")
PORTABLE_FLAGS = tuple(f for f in FLAGS if f != "-march=native")  # compilers without it
FORWARD, BACKWARD = "tailored_jax_flash_forward", "tailored_jax_flash_backward"
DECODE_PART = "tailored_jax_decode_part"
TARGETS = (
    (FORWARD, "TjFlashForward"),
    (BACKWARD, "TjFlashBackward"),
    (DECODE_PART, "TjDecodePart"),
)

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once decided; "why": the reason it is not
_registered: list = []  # the library whose handlers XLA holds (it takes a target name once)


def _cpu_identity() -> str:
  """What -march=native compiles for: the CPU's model and flags."""
  try:
    text = Path("/proc/cpuinfo").read_text()
    return "\n".join(
        sorted({line for line in text.splitlines() if line.startswith(("model name", "flags"))})
    )
  except OSError:
    return platform.processor() or platform.machine()


def _target_features() -> str:
  """The compiler's predefined macros for `-march=native` (`__AVX512F__`, `__ARM_FEATURE_SVE`,
  ...): the instruction set a build uses, on every architecture, even where /proc/cpuinfo says
  little (aarch64). Empty where the compiler cannot run (the build then fails anyway)."""
  for flags in (("-march=native",), ()):
    try:
      done = subprocess.run(
          [os.environ.get("CXX", "g++"), *flags, "-dM", "-E", "-x", "c++", os.devnull],
          capture_output=True,
          text=True,
          timeout=60,
      )
    except (OSError, subprocess.SubprocessError):
      return ""
    if not done.returncode:
      return "\n".join(sorted(done.stdout.splitlines()))
  return ""


def library_path() -> Path:
  """Where this machine's build of the kernel lives (or will): keyed by the source, flags,
  jax, compiler, CPU and the instruction set the compiler targets here."""
  key = hashlib.sha256(
      b"\0".join(
          [
              *(source.read_bytes() for source in SOURCES),
              " ".join(FLAGS).encode(),
              jax.__version__.encode(),
              jax.lib.__version__.encode() if hasattr(jax.lib, "__version__") else b"",
              platform.machine().encode(),
              _cpu_identity().encode(),
              os.environ.get("CXX", "g++").encode(),
              _target_features().encode(),
          ]
      )
  ).hexdigest()[:16]
  cache = Path(os.environ.get("TAILORED_JAX_CACHE") or Path.home() / ".cache" / "tailored_jax")
  return cache / f"cpu_attention-{key}.so"


def build(path: Path) -> None:
  """Compiles the kernel to `path` (atomically: a partial build is never loaded), for this CPU
  or, where the compiler refuses that, for its architecture's baseline."""
  path.parent.mkdir(parents=True, exist_ok=True)
  failures = []
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = Path(tmp) / path.name
    for flags in (FLAGS, PORTABLE_FLAGS):
      command = [
          os.environ.get("CXX", "g++"),
          *flags,
          f"-I{jax.ffi.include_dir()}",
          *(str(source) for source in SOURCES if source.suffix == ".cc"),
          "-o",
          str(out),
      ]
      done = subprocess.run(command, capture_output=True, text=True, timeout=600)
      if not done.returncode:
        os.replace(out, path)
        return
      failures.append(
          f"{' '.join(command)} failed ({done.returncode}): " f"{done.stderr.strip()[-1000:]}"
      )
  raise RuntimeError("; ".join(failures))


def available() -> bool:
  """Whether the native kernel is built, loaded and registered (done once per process)."""
  with _lock:
    if "ok" not in _state:
      try:
        path = library_path()
        if not path.exists():
          build(path)
        try:
          library = ctypes.CDLL(str(path))
        except OSError as e:  # a damaged cached build: build it again, once
          logging.warning("rebuilding %s, which did not load: %s", path, e)
          build(path)
          library = ctypes.CDLL(str(path))
        if not _registered:
          for name, symbol in TARGETS:
            jax.ffi.register_ffi_target(
                name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
            )
          _registered.append(library)
        _state.update(ok=True)
      except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        _state.update(ok=False, why=str(e))
        logging.warning("native CPU attention unavailable, using the XLA form: %s", e)
    return _state["ok"]


def turn_off(reason: str) -> None:
  """The XLA form from now on in this process (e.g. another process of the run cannot build
  the kernel: all must trace the same program)."""
  with _lock:
    _state.update(ok=False, why=reason)
  logging.warning("native CPU attention off: %s", reason)


def wide_vectors() -> bool:
  """Whether the compiler targets 512-bit vectors here (AVX-512). The kernel computes in
  16-float vectors; where the target's are narrower (AVX2, NEON) the compiler splits each one,
  and the kernel ran 4-10x slower than the blockwise XLA form (AMD EPYC Zen 3, AVX2:
  docs/bench_attention_avx2_amd.json). 'auto' takes the kernel only where this holds."""
  return "__AVX512F__" in _target_features()


def fast_here() -> bool:
  """Whether 'auto' takes the kernel: built here, for 512-bit vectors, and not set aside for
  'auto' by `not_for_auto` (another process of the run lacks them)."""
  return available() and wide_vectors() and _state.get("auto", True)


def not_for_auto(reason: str) -> None:
  """'auto' takes the blockwise XLA form from now on in this process; an explicit
  `model.attention=cpu_native` still runs the kernel."""
  with _lock:
    _state["auto"] = False
  logging.info("native CPU attention not chosen by 'auto': %s", reason)


def why() -> str:
  """Why the kernel is not available here ('' where it is, or before it was tried)."""
  return _state.get("why", "")


def usable(dtype) -> bool:
  """Whether the kernel can run the training attention here: float32 compute, built here."""
  return jnp.dtype(dtype) == jnp.float32 and available()


def _forward_call(q_btnh, k_btkh, v_btkh, real_bt, context, scale: float, window: int):
  b, t, n, _ = q_btnh.shape
  shapes = (
      jax.ShapeDtypeStruct(q_btnh.shape, jnp.float32),
      jax.ShapeDtypeStruct((b, n, t), jnp.float32),
  )
  return jax.ffi.ffi_call(FORWARD, shapes, vmap_method="sequential")(
      q_btnh, k_btkh, v_btkh, real_bt, *context, scale=np.float32(scale), window=np.int64(window)
  )


def _backward_call(
    q_btnh,
    k_btkh,
    v_btkh,
    real_bt,
    context,
    out_btnh,
    lse_bnt,
    dout_btnh,
    dlse_bnt,
    scale: float,
    window: int,
):
  """dq, dk, dv and the context's dk, dv per row ([batch, kv_heads, slots, head_dim])."""
  context_k_gksh = context[0]
  per_row = (q_btnh.shape[0], *context_k_gksh.shape[1:])
  shapes = (
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_btnh, k_btkh, v_btkh))
      + (jax.ShapeDtypeStruct(per_row, jnp.float32),) * 2
  )
  return jax.ffi.ffi_call(BACKWARD, shapes, vmap_method="sequential")(
      q_btnh,
      k_btkh,
      v_btkh,
      real_bt,
      *context,
      out_btnh,
      lse_bnt,
      dout_btnh,
      dlse_bnt,
      scale=np.float32(scale),
      window=np.int64(window),
  )


def _named_forward(q_btnh, k_btkh, v_btkh, real_bt, context, scale, window, names):
  """The forward's outputs, named (`names`) for a remat policy: the primal outputs and the
  backward's residuals are then the same kept values."""
  outputs = _forward_call(q_btnh, k_btkh, v_btkh, real_bt, context, scale, window)
  return tuple(checkpoint_name(x, name) for x, name in zip(outputs, names)) if names else outputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(
    q_btnh,
    k_btkh,
    v_btkh,
    real_bt,
    context_k_gksh,
    context_v_gksh,
    context_real_bs,
    scale: float,
    window: int,
    names: tuple,
):
  context = (context_k_gksh, context_v_gksh, context_real_bs)
  return _named_forward(q_btnh, k_btkh, v_btkh, real_bt, context, scale, window, names)


def _flash_fwd(
    q_btnh,
    k_btkh,
    v_btkh,
    real_bt,
    context_k_gksh,
    context_v_gksh,
    context_real_bs,
    scale,
    window,
    names,
):
  context = (context_k_gksh, context_v_gksh, context_real_bs)
  out_btnh, lse_bnt = _named_forward(q_btnh, k_btkh, v_btkh, real_bt, context, scale, window, names)
  return (out_btnh, lse_bnt), (q_btnh, k_btkh, v_btkh, real_bt, context, out_btnh, lse_bnt)


def _flash_bwd(scale, window, names, residuals, cotangents):
  q_btnh, k_btkh, v_btkh, real_bt, context, out_btnh, lse_bnt = residuals
  dq, dk, dv, context_dk, context_dv = _backward_call(
      q_btnh, k_btkh, v_btkh, real_bt, context, out_btnh, lse_bnt, *cotangents, scale, window
  )
  groups = context[0].shape[0]
  per_group = lambda d_bksh: d_bksh.reshape(
      groups, d_bksh.shape[0] // groups, *d_bksh.shape[1:]
  ).sum(1)
  return dq, dk, dv, None, per_group(context_dk), per_group(context_dv), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q_btnh,
    k_btkh,
    v_btkh,
    valid_bt,
    window: int = 0,
    output_names: tuple = (),
    context: tuple | None = None,
):
  """(output [batch, tokens, heads, head_dim], log-sum-exp [batch, heads, tokens]) of causal
  grouped-query attention with padding keys masked (and, with a `window`, keys that far back);
  with a `context` (keys and values [groups, kv_heads, slots, head_dim] read by groups of
  consecutive rows, which slots each row sees [batch, slots]; no window) every token also sees
  its row's context, under one softmax. Differentiable in q, k, v and the context's keys and
  values, through both outputs, which `output_names` names for a remat policy. Under a mesh each
  device runs its own rows and heads (`shard_map`): XLA cannot split a custom call itself."""
  if not available():
    raise RuntimeError(f"native CPU attention unavailable: {_state['why']}")
  b, _, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  if context is None:
    empty = jnp.zeros((1, kv, 0, h), jnp.float32)
    context = (empty, empty, jnp.zeros((b, 0), bool))
  elif window:
    raise ValueError("the native CPU attention takes a context only without a sliding window")
  as_f32 = lambda x: x.astype(jnp.float32)
  args = (*map(as_f32, (q_btnh, k_btkh, v_btkh, valid_bt)), *map(as_f32, context))
  names = tuple(output_names)
  kernel = lambda *args: _flash(*args, h**-0.5, window, names)
  mesh = shard.trace_mesh()
  if mesh is None:
    return kernel(*args)
  groups = context[0].shape[0] if context[0].shape[2] else b
  rows, heads = shard.split_axes(mesh, b, groups, n, kv)
  per_token = PartitionSpec(rows, None, heads, None)
  per_row = PartitionSpec(rows, None)
  per_slot = PartitionSpec(rows if context[0].shape[2] else None, heads, None, None)
  return shard.per_device(
      kernel,
      mesh,
      (per_token, per_token, per_token, per_row, per_slot, per_slot, per_row),
      (per_token, PartitionSpec(rows, heads, None)),
  )(*args)


def causal_attention(q_btnh, k_btkh, v_btkh, valid_bt, window: int = 0):
  """The blockwise form's values from this kernel, its inputs and outputs named as the
  blockwise form's for the 'save_attention' policy."""
  q_btnh, k_btkh, v_btkh = tag_all((q_btnh, k_btkh, v_btkh), FLASH_INPUTS)
  return flash_attention(q_btnh, k_btkh, v_btkh, valid_bt, window, FLASH_OUTPUTS)[0]


def context_attention(q_btnh, k_btkh, v_btkh, valid_bt, kv: ContextKV):
  """`blockwise.blockwise_context_attention`'s values (no window): the context and the rows'
  own keys under one softmax; named as the blockwise form's for the remat policy."""
  q_btnh, k_btkh, v_btkh = tag_all((q_btnh, k_btkh, v_btkh), FLASH_INPUTS)
  context = (kv.k_gksh, kv.v_gksh, kv.mask_bts[:, 0, :])  # without a window, the same per token
  return flash_attention(q_btnh, k_btkh, v_btkh, valid_bt, 0, FLASH_OUTPUTS, context)[0]
