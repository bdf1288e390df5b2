"""The native CPU flash kernel (`models/attention/cpu_native`) against the blockwise XLA form:
outputs, log-sum-exps and gradients, grouped heads, odd head sizes and lengths, padding,
sliding windows, a mesh; and the fallback where it cannot be built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailored_jax import sharding
from tailored_jax.models.attention import blockwise, cpu_native, dispatch
from tailored_jax.models.attention.contexts import ContextKV
from tests.test_model_and_decode import _mesh_cfg

needs_kernel = pytest.mark.skipif(
    not cpu_native.available(),
    reason="the native CPU attention did not build (no C++ compiler?)",
)


def _inputs(b, t, n, kv, h, lengths=None, seed=0):
  rng = np.random.default_rng(seed)
  draw = lambda heads: jnp.asarray(rng.standard_normal((b, t, heads, h), np.float32))
  valid = np.ones((b, t), bool)
  for row, length in enumerate(lengths or []):
    valid[row, length:] = False
  return (
      draw(n),
      draw(kv),
      draw(kv),
      draw(n),
      draw(n)[..., 0].transpose(0, 2, 1),
      jnp.asarray(valid),
  )


def _xla(q, k, v, valid, window):
  """The blockwise form's (output, log-sum-exp [b, heads, t]), as `_flash_attention` gives them."""
  b, t, n, h = q.shape
  q_bkgth, k_bkht, v_bkht = blockwise._flash_layout(q, k, v, jnp.float32)
  out, lse = blockwise._flash_attention(
      q_bkgth, k_bkht, v_bkht, valid, True, window, blockwise.ATTENTION_BLOCK, h**-0.5
  )
  return blockwise._from_flash_layout(out), lse.reshape(b, n, t)


def _native(q, k, v, valid, window):
  return cpu_native.flash_attention(q, k, v, valid, window)


def _loss(attention, valid, weights, lse_weights, window):
  """A weighted sum of both outputs over real queries (padding queries' values are unused)."""

  def loss(q, k, v):
    out, lse = attention(q, k, v, valid, window)
    real = valid[:, :, None, None]
    return jnp.sum(jnp.where(real, out * weights, 0)) + jnp.sum(
        jnp.where(valid[:, None, :], lse * lse_weights, 0)
    )

  return loss


@needs_kernel
@pytest.mark.parametrize(
    "b, t, n, kv, h, lengths, window",
    [
        (2, 100, 4, 2, 16, None, 0),  # grouped heads, a length off the 64-token block
        (2, 45, 4, 2, 8, [30, 45], 0),  # head_dim under a vector, padding
        (3, 70, 6, 3, 24, None, 9),  # sliding window
        (2, 200, 6, 2, 32, [150, 200], 0),
        (2, 130, 2, 1, 128, [1, 77], 0),  # a row with one real token
        (1, 300, 3, 3, 64, None, 70),
    ],
)
def test_native_kernel_equals_the_blockwise_form(b, t, n, kv, h, lengths, window):
  q, k, v, weights, lse_weights, valid = _inputs(b, t, n, kv, h, lengths)
  want, got = (jax.jit(f, static_argnums=4)(q, k, v, valid, window) for f in (_xla, _native))
  real = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got[0])[real], np.asarray(want[0])[real], atol=2e-6)
  np.testing.assert_allclose(
      np.asarray(got[1]).transpose(0, 2, 1)[real],
      np.asarray(want[1]).transpose(0, 2, 1)[real],
      atol=2e-6,
  )
  grads = [
      jax.jit(jax.grad(_loss(f, valid, weights, lse_weights, window), (0, 1, 2)))(q, k, v)
      for f in (_xla, _native)
  ]
  for name, w, g in zip("qkv", *grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d{name}")


@needs_kernel
@pytest.mark.parametrize(
    "b, groups, t, slots, n, kv, h",
    [(6, 2, 70, 90, 4, 2, 16), (2, 2, 20, 5, 3, 3, 8), (4, 1, 130, 64, 2, 1, 24)],
)
def test_native_context_attention_equals_the_two_merged_parts(b, groups, t, slots, n, kv, h):
  """Rows continuing a read-only context (self-reflection's continuations after their prefix):
  one softmax over the context and the rows' own keys against the blockwise form's two merged
  flash parts; gradients reach the context's keys and values, summed over each group's rows."""
  q, k, v, weights, _, valid = _inputs(b, t, n, kv, h, [t, t - 7] * (b // 2))
  rng = np.random.default_rng(1)
  context_k, context_v = (
      jnp.asarray(rng.standard_normal((groups, kv, slots, h), np.float32)) for _ in range(2)
  )
  seen_bs = np.ones((b, slots), bool)
  seen_bs[0, :3] = False  # a left-padded prefix
  mask_bts = jnp.broadcast_to(jnp.asarray(seen_bs)[:, None, :], (b, t, slots))

  def loss(attention):

    def value(q, k, v, context_k, context_v):
      out = attention(q, k, v, valid, ContextKV(context_k, context_v, mask_bts))
      return jnp.sum(jnp.where(valid[:, :, None, None], out * weights, 0))

    return jax.jit(jax.value_and_grad(value, (0, 1, 2, 3, 4)))

  xla = lambda q, k, v, valid, kv: blockwise.blockwise_context_attention(
      q, k, v, valid, kv, jnp.float32
  )
  (want, want_grads), (got, got_grads) = (
      loss(f)(q, k, v, context_k, context_v) for f in (xla, cpu_native.context_attention)
  )
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for name, w, g in zip(["q", "k", "v", "context k", "context v"], want_grads, got_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d{name}")


@needs_kernel
def test_causal_attention_picks_the_kernel_by_config_and_dtype():
  q, k, v, _, _, valid = _inputs(2, 40, 4, 2, 16, [40, 33])
  lowered = (
      lambda kernel, dtype=jnp.float32: jax.jit(
          lambda q, k, v: dispatch.causal_attention(q, k, v, valid, dtype, 0, kernel)
      )
      .lower(q, k, v)
      .as_text()
  )
  assert cpu_native.FORWARD in lowered("cpu_native")
  assert cpu_native.FORWARD not in lowered("cpu_blockwise")
  assert cpu_native.FORWARD not in lowered("cpu_native", jnp.bfloat16)  # float32 only


@needs_kernel
def test_native_kernel_on_a_mesh_runs_each_devices_rows_and_heads():
  """Under the train step's activation layout each device runs its own rows and heads (no
  gather of q, k, v), with one device's values."""
  q, k, v, weights, lse_weights, valid = _inputs(4, 96, 4, 2, 16, [96, 80, 50, 96])
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2, 8))
  loss = _loss(_native, valid, weights, lse_weights, 0)
  want = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)
  placed = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
  )
  q, k, v = jax.device_put((q, k, v), placed)
  with sharding.activation_layout(mesh):
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    got = step(q, k, v)
  assert "all-gather" not in compiled.as_text()
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)  # summed in another order
  for w, g in zip(want[1], got[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)


def test_a_kernel_that_cannot_build_falls_back_to_the_xla_form(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("CXX", "false")  # a compiler that always fails
  monkeypatch.setenv("TAILORED_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(cpu_native, "_state", {})
  assert not cpu_native.available()
  assert "failed" in cpu_native._state["why"] and not list(tmp_path.glob("*.so"))
  q, k, v, _, _, valid = _inputs(2, 40, 4, 2, 16)
  text = (
      jax.jit(
          lambda q, k, v: dispatch.causal_attention(q, k, v, valid, jnp.float32, 0, "cpu_native")
      )
      .lower(q, k, v)
      .as_text()
  )
  assert cpu_native.FORWARD not in text
  choice = dispatch.choose("auto", jax.devices(), "float32", 16)
  assert choice.implementation == "cpu_blockwise" and "does not build here" in choice.reason


@needs_kernel
def test_a_damaged_cached_build_is_built_again(monkeypatch, tmp_path):
  monkeypatch.setenv("TAILORED_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(cpu_native, "_state", {})
  path = cpu_native.library_path()
  path.write_bytes(b"not a shared library")
  assert cpu_native.available()
  assert path.read_bytes()[:4] == b"\x7fELF"


@needs_kernel
def test_a_compiler_without_march_native_builds_for_the_baseline(monkeypatch, tmp_path):
  """Compilers that refuse -march=native (Apple clang on arm64) get the portable flags."""
  compiler = tmp_path / "cxx"
  compiler.write_text(
      '#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec g++ "$@"\n'
  )
  compiler.chmod(0o755)
  monkeypatch.setenv("CXX", str(compiler))
  path = tmp_path / "cache" / "kernel.so"
  cpu_native.build(path)
  assert path.read_bytes()[:4] == b"\x7fELF"
  compiler.write_text("#!/bin/sh\nexit 3\n")
  with pytest.raises(RuntimeError, match="failed \\(3\\).*failed \\(3\\)"):
    cpu_native.build(tmp_path / "cache" / "other.so")


@needs_kernel
def test_the_cache_key_follows_the_compilers_target_features(monkeypatch, tmp_path):
  """Two CPUs with the same model line but other instruction sets (aarch64's /proc/cpuinfo
  names neither) get different builds: the key holds the compiler's -march=native macros."""
  compiler = tmp_path / "cxx"
  compiler.write_text('#!/bin/sh\nexec g++ "$@" "-DTJ_FEATURE_$TJ_FEATURE"\n')
  compiler.chmod(0o755)
  monkeypatch.setenv("CXX", str(compiler))
  key = lambda feature: (monkeypatch.setenv("TJ_FEATURE", feature), cpu_native.library_path())[1]
  assert key("AVX512") == key("AVX512") != key("SVE")
  features = cpu_native._target_features()
  assert "TJ_FEATURE_SVE" in features and ("__x86_64__" in features or "__aarch64__" in features)
