"""The training attention: chosen once from the config and the devices a step compiles for (no
backend read while tracing), and the TPU kernel's values and gradients against the XLA forms
(Pallas interpret mode runs the splash kernel on CPU)."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailored_jax import config_lib, sharding
from tailored_jax.models import for_devices
from tailored_jax.models.attention import blockwise, cpu_native, dispatch, splash
from tailored_jax.models.attention.contexts import ContextKV
from tailored_jax.models.llama import Llama
from tailored_jax.train.trainer import Trainer
from tests.test_model_and_decode import CFG, _batch, _mesh_cfg, _train_cfg


def _device(platform, kind="", capability=None):
  return SimpleNamespace(platform=platform, device_kind=kind, compute_capability=capability)


@pytest.mark.parametrize(
    "requested, device, dtype, head_dim, want",
    [
        ("auto", _device("tpu", "TPU v5 lite"), "bfloat16", 64, "splash"),
        ("auto", _device("gpu", "H100", "9.0"), "bfloat16", 256, "cudnn"),
        ("auto", _device("gpu", "A100", "8.0"), "bfloat16", 256, "xla"),  # head size > 128
        ("auto", _device("gpu", "A100", "8.0"), "float32", 64, "xla"),  # cuDNN: bf16/fp16
        ("auto", _device("gpu", "A100", "8.0"), "float16", 128, "cudnn"),
        ("auto", _device("cpu"), "bfloat16", 64, "cpu_blockwise"),  # the kernel is float32
        ("xla", _device("tpu"), "bfloat16", 64, "xla"),
        ("cpu_blockwise", _device("gpu"), "bfloat16", 64, "cpu_blockwise"),
    ],
)
def test_auto_chooses_by_the_devices_dtype_and_head_size(requested, device, dtype, head_dim, want):
  choice = dispatch.choose(requested, [device], dtype, head_dim)
  assert choice.implementation == want and choice.reason


@pytest.mark.parametrize("avx512", [True, False])
def test_auto_takes_the_native_kernel_only_for_512_bit_vectors(monkeypatch, avx512):
  """The kernel computes in 16-float vectors: split in two on AVX2 it ran 4-10x slower than the
  blockwise form, so 'auto' takes it only where the compiler targets AVX-512; asked for by
  name it runs anyway."""
  if not cpu_native.available():
    pytest.skip(f"the native kernel does not build here: {cpu_native.why()}")
  macros = "#define __AVX2__ 1" + ("\n#define __AVX512F__ 1" if avx512 else "")
  monkeypatch.setattr(cpu_native, "_target_features", lambda: macros)
  choice = dispatch.choose("auto", [_device("cpu")], "float32", 64)
  assert choice.implementation == ("cpu_native" if avx512 else "cpu_blockwise")
  assert avx512 or "no AVX-512" in choice.reason
  assert dispatch.choose("cpu_native", [_device("cpu")], "float32", 64).implementation == (
      "cpu_native"
  )


def test_auto_sets_the_kernel_aside_when_another_process_lacks_avx512(monkeypatch):
  """Processes agree before tracing: one with AVX-512 beside one without takes the blockwise
  form too ('auto'), or the two would trace different programs and hang."""
  if not cpu_native.available():
    pytest.skip(f"the native kernel does not build here: {cpu_native.why()}")
  from tailored_jax import runtime

  monkeypatch.setattr(cpu_native, "_target_features", lambda: "#define __AVX512F__ 1")
  monkeypatch.setitem(cpu_native._state, "auto", True)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  answers = iter([1, 0])  # every process builds the kernel; one of them lacks AVX-512
  monkeypatch.setattr(sharding, "smallest", lambda value: min(value, next(answers)))
  mesh = SimpleNamespace(devices=np.asarray([_device("cpu")]))
  assert dispatch.choose("auto", [_device("cpu")], "float32", 64).implementation == "cpu_native"
  runtime.one_attention_for_all_processes(config_lib.base_config().model, mesh)
  choice = dispatch.choose("auto", [_device("cpu")], "float32", 64)
  assert choice.implementation == "cpu_blockwise" and "another process" in choice.reason
  assert cpu_native.available()  # asked for by name, the kernel still runs


def test_a_kernel_for_another_platform_is_refused_naming_the_field():
  with pytest.raises(config_lib.ConfigError, match=r"model.attention: 'splash' runs on tpu.*cpu"):
    dispatch.choose("splash", jax.devices(), "float32", 64)  # main: one `error:` line
  with pytest.raises(dispatch.AttentionError, match=r"'cudnn' runs on gpu.*tpu"):
    dispatch.choose("cudnn", [_device("tpu", "TPU v4")], "bfloat16", 64)
  assert set(dispatch.REQUESTS) == set(config_lib.ATTENTION)


def test_the_step_is_traced_without_reading_the_default_backend(monkeypatch):
  """The trainer chooses from its mesh's devices before tracing; while the step traces and
  compiles nothing asks `jax.default_backend()` (on a TPU host with a CPU mesh, or the reverse,
  it would answer for the wrong devices)."""
  trainer = Trainer(Llama(CFG), _train_cfg(), sharding.make_mesh(_mesh_cfg(1, 2, 2, 4)))
  want = "cpu_native" if cpu_native.fast_here() else "cpu_blockwise"
  assert (trainer.model.cfg.attention, trainer.model.cfg.platform) == (want, "cpu")

  def no_backend_reads(*_, **__):
    raise AssertionError("jax.default_backend() read while tracing")

  monkeypatch.setattr(jax, "default_backend", no_backend_reads)
  lm, reflection = (trainer.put_batch(x) for x in _batch(np.random.default_rng(0)))
  trainer.step_fn().lower(trainer.abstract_state(), lm, reflection)


def _inputs(b, t, n, kv, h, seed=0):
  rng = np.random.default_rng(seed)
  draw = lambda heads: jnp.asarray(rng.standard_normal((b, t, heads, h), np.float32))
  valid = np.ones((b, t), bool)
  valid[1, 30:] = False  # right padding
  valid[2, :7] = False  # left padding
  return draw(n), draw(kv), draw(kv), draw(n), jnp.asarray(valid)


def _value_and_grads(attention, valid, weights, argnums):
  loss = lambda *a: jnp.sum(jnp.where(valid[:, :, None, None], attention(*a) * weights, 0))
  return jax.jit(jax.value_and_grad(loss, argnums))


@pytest.mark.parametrize("window", [0, 9])
def test_splash_kernel_equals_the_blockwise_form_with_gradients(window):
  """Grouped heads (4 over 2), a head size and length below the kernel's 128 lanes (padded),
  left and right padding, a sliding window: outputs and q/k/v gradients at real tokens."""
  q, k, v, weights, valid = _inputs(3, 40, 4, 2, 16)
  forms = {
      "blockwise": lambda q, k, v: blockwise.blockwise_causal_attention(
          q, k, v, valid, jnp.float32, window
      ),
      "splash": lambda q, k, v: splash.causal_attention(
          q, k, v, valid, jnp.float32, window, interpret=True
      ),
  }
  (want, want_grads), (got, got_grads) = (
      _value_and_grads(f, valid, weights, (0, 1, 2))(q, k, v) for f in forms.values()
  )
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for name, w, g in zip("qkv", want_grads, got_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d{name}")


def test_splash_context_kernel_equals_the_two_merged_parts():
  """Self-reflection's continuations after a prefix shared by groups of rows (a left-padded
  prefix slot unseen): one kernel over prefix + own tokens against the blockwise form's two
  parts merged by log-sum-exp, with gradients for the prefix keys and values too."""
  b, t, n, kv, h, groups, slots = 6, 40, 4, 2, 16, 2, 24
  q, k, v, weights, valid = _inputs(b, t, n, kv, h)
  rng = np.random.default_rng(1)
  context_k, context_v = (
      jnp.asarray(rng.standard_normal((groups, kv, slots, h), np.float32)) for _ in range(2)
  )
  seen_bs = np.ones((b, slots), bool)
  seen_bs[:3, :5] = False  # group 0's prefix is left-padded
  mask_bts = jnp.broadcast_to(jnp.asarray(seen_bs)[:, None, :], (b, t, slots))
  forms = {
      "blockwise": blockwise.blockwise_context_attention,
      "splash": lambda *a: splash.context_attention(*a, interpret=True),
  }
  results = [
      _value_and_grads(
          lambda q, k, v, ck, cv, f=f: f(q, k, v, valid, ContextKV(ck, cv, mask_bts), jnp.float32),
          valid,
          weights,
          (0, 1, 2, 3, 4),
      )(q, k, v, context_k, context_v)
      for f in forms.values()
  ]
  (want, want_grads), (got, got_grads) = results
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for name, w, g in zip(["q", "k", "v", "context k", "context v"], want_grads, got_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d{name}")


def test_a_train_step_with_the_splash_kernel_equals_the_blockwise_one():
  """The whole step (LM rows and self-reflection continuations after their prefix) on a
  2 x 2 mesh, the kernel per device under `shard_map`: loss and updated weights agree."""
  mesh = sharding.make_mesh(_mesh_cfg(1, 2, 2, 4))
  batches = _batch(np.random.default_rng(0))
  results = []
  for attention in ("cpu_blockwise", dispatch.SPLASH_INTERPRET):
    cfg = dataclasses.replace(CFG, attention=attention, platform="cpu")
    trainer = Trainer(for_devices(Llama(cfg), mesh.devices.flat), _train_cfg(), mesh)
    state = trainer.new_state(trainer.init_params(0))
    lm, reflection = (trainer.put_batch(x) for x in batches)
    state, metrics = trainer.step_fn()(state, lm, reflection)
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (want_params, want), (got_params, got) = results
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["sr_loss"], want["sr_loss"], rtol=1e-4, atol=1e-6)
  for w, g in zip(jax.tree.leaves(want_params), jax.tree.leaves(got_params)):
    np.testing.assert_allclose(g, w, atol=1e-6)
