"""The training step's causal self-attention on CPU as a native flash kernel (`cpu_attention.cc`,
forward and backward, XLA's intra-op threads): XLA:CPU runs the blockwise form's small per-head
matmuls at a third of its matmul peak, and this kernel runs the whole attention about twice as
fast. Compiled with the machine's C++ compiler on first use into a cache directory
($TAILORED_JAX_CACHE, else ~/.cache/tailored_jax), keyed by the source, the flags, jaxlib and
the CPU; where that fails, `available()` is False (the reason logged once) and the models use
the blockwise XLA form (`layers.blockwise_causal_attention`), which computes the same values.
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

SOURCE = Path(__file__).with_name("cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-fPIC", "-shared", "-w")
FORWARD, BACKWARD = "tailored_jax_flash_forward", "tailored_jax_flash_backward"

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once decided; "why": the reason it is not


def _cpu_identity() -> str:
  """What -march=native compiles for: the CPU's model and flags."""
  try:
    text = Path("/proc/cpuinfo").read_text()
    return "\n".join(
        sorted({line for line in text.splitlines() if line.startswith(("model name", "flags"))}))
  except OSError:
    return platform.processor() or platform.machine()


def library_path() -> Path:
  """Where this machine's build of the kernel lives (or will)."""
  key = hashlib.sha256(b"\0".join([
      SOURCE.read_bytes(), " ".join(FLAGS).encode(),
      jax.__version__.encode(),
      jax.lib.__version__.encode() if hasattr(jax.lib, "__version__") else b"",
      _cpu_identity().encode(),
      os.environ.get("CXX", "g++").encode()
  ])).hexdigest()[:16]
  cache = Path(os.environ.get("TAILORED_JAX_CACHE") or Path.home() / ".cache" / "tailored_jax")
  return cache / f"cpu_attention-{key}.so"


def build(path: Path) -> None:
  """Compiles the kernel to `path` (atomically: a partial build is never loaded)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = Path(tmp) / path.name
    command = [
        os.environ.get("CXX", "g++"), *FLAGS, f"-I{jax.ffi.include_dir()}",
        str(SOURCE), "-o",
        str(out)
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): "
                         f"{done.stderr.strip()[-2000:]}")
    os.replace(out, path)


def available() -> bool:
  """Whether the native kernel is built, loaded and registered (done once per process)."""
  with _lock:
    if "ok" not in _state:
      try:
        path = library_path()
        if not path.exists():
          build(path)
        library = ctypes.CDLL(str(path))
        for name, symbol in ((FORWARD, "TjFlashForward"), (BACKWARD, "TjFlashBackward")):
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                      platform="cpu")
        _state.update(ok=True, library=library)
      except (OSError, RuntimeError, AttributeError) as e:
        _state.update(ok=False, why=str(e))
        logging.warning("native CPU attention unavailable, using the XLA form: %s", e)
    return _state["ok"]


def supports(q_btnh, k_btkh, dtype) -> bool:
  """What the kernel takes: float32 compute, query heads a multiple of the kv heads."""
  return jnp.dtype(dtype) == jnp.float32 and q_btnh.shape[2] % k_btkh.shape[2] == 0


def _forward_call(q_btnh, k_btkh, v_btkh, real_bt, scale: float, window: int):
  b, t, n, _ = q_btnh.shape
  shapes = (jax.ShapeDtypeStruct(q_btnh.shape,
                                 jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
  return jax.ffi.ffi_call(FORWARD, shapes,
                          vmap_method="sequential")(q_btnh, k_btkh, v_btkh, real_bt,
                                                    scale=np.float32(scale),
                                                    window=np.int64(window))


def _backward_call(q_btnh, k_btkh, v_btkh, real_bt, out_btnh, lse_bnt, dout_btnh, dlse_bnt,
                   scale: float, window: int):
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_btnh, k_btkh, v_btkh))
  return jax.ffi.ffi_call(BACKWARD, shapes,
                          vmap_method="sequential")(q_btnh, k_btkh, v_btkh, real_bt, out_btnh,
                                                    lse_bnt, dout_btnh, dlse_bnt,
                                                    scale=np.float32(scale),
                                                    window=np.int64(window))


def _named_forward(q_btnh, k_btkh, v_btkh, real_bt, scale, window, names):
  """The forward's outputs, named (`names`) for a remat policy: the primal outputs and the
  backward's residuals are then the same kept values."""
  outputs = _forward_call(q_btnh, k_btkh, v_btkh, real_bt, scale, window)
  return tuple(checkpoint_name(x, name) for x, name in zip(outputs, names)) if names else outputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q_btnh, k_btkh, v_btkh, real_bt, scale: float, window: int, names: tuple):
  return _named_forward(q_btnh, k_btkh, v_btkh, real_bt, scale, window, names)


def _flash_fwd(q_btnh, k_btkh, v_btkh, real_bt, scale, window, names):
  out_btnh, lse_bnt = _named_forward(q_btnh, k_btkh, v_btkh, real_bt, scale, window, names)
  return (out_btnh, lse_bnt), (q_btnh, k_btkh, v_btkh, real_bt, out_btnh, lse_bnt)


def _flash_bwd(scale, window, names, residuals, cotangents):
  dq, dk, dv = _backward_call(*residuals, *cotangents, scale, window)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _split(mesh, rows: int, heads: int, kv_heads: int):
  """(rows' mesh axes, heads' mesh axis) the kernel runs split over, as the activations lie
  (`sharding.RULES`: rows over data × fsdp, heads over tensor); None where they do not divide."""
  size = lambda name: mesh.shape.get(name, 1)
  row_axes = tuple(a for a in ("data", "fsdp") if size(a) > 1)
  row_shards = int(np.prod([size(a) for a in row_axes])) if row_axes else 1
  tensor = size("tensor")
  return (row_axes if row_axes and rows % row_shards == 0 else None,
          "tensor" if tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0 else None)


def flash_attention(q_btnh, k_btkh, v_btkh, valid_bt, window: int = 0, output_names: tuple = ()):
  """(output [batch, tokens, heads, head_dim], log-sum-exp [batch, heads, tokens]) of causal
  grouped-query attention with padding keys masked (and, with a `window`, keys that far back);
  differentiable in q, k, v, through both outputs, which `output_names` names for a remat
  policy. Under a mesh each device runs its own rows and heads (`shard_map`): XLA cannot split a
  custom call itself."""
  if not available():
    raise RuntimeError(f"native CPU attention unavailable: {_state['why']}")
  scale = q_btnh.shape[-1]**-0.5
  real_bt = valid_bt.astype(jnp.float32)
  args = tuple(x.astype(jnp.float32) for x in (q_btnh, k_btkh, v_btkh)) + (real_bt,)
  kernel = lambda q, k, v, real: _flash(q, k, v, real, scale, window, tuple(output_names))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(*args)
  rows, heads = _split(mesh, q_btnh.shape[0], q_btnh.shape[2], k_btkh.shape[2])
  per_token = PartitionSpec(rows, None, heads, None)
  per_head = PartitionSpec(rows, heads, None)
  return jax.shard_map(kernel, mesh=mesh,
                       in_specs=(per_token, per_token, per_token, PartitionSpec(rows, None)),
                       out_specs=(per_token, per_head), check_vma=False)(*args)
