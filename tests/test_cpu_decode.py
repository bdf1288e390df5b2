"""The native CPU decode attention (`models/attention/cpu_decode`): one-token softmax parts equal
the XLA form's (`cached.attend_part`) over keys shared by groups of rows, with rows that keep no
slot; and a decode layer on CPU devices takes it for a row's own keys but not for a prefix that
every row reads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailored_jax.models import for_devices
from tailored_jax.models.attention import cached, cpu_decode, cpu_native, dispatch
from tailored_jax.models.llama import Llama, LlamaConfig

needs_kernel = pytest.mark.skipif(
    not cpu_native.available(),
    reason="the native CPU attention did not build (no C++ compiler?)",
)


def _draw(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape, np.float32))


@needs_kernel
@pytest.mark.parametrize(
    "b, groups, kv_heads, x, h, slots",
    [(6, 6, 3, 3, 64, 70), (8, 4, 2, 1, 16, 33), (4, 1, 1, 8, 128, 5)],
)
def test_decode_part_equals_the_xla_form(b, groups, kv_heads, x, h, slots):
  rng = np.random.default_rng(b + slots)
  q = _draw(rng, b, kv_heads, x, h)
  k, v = _draw(rng, groups, kv_heads, slots, h), _draw(rng, groups, kv_heads, slots, h)
  mask_bs = rng.random((b, slots)) < 0.6
  mask_bs[0] = False  # a free slot's row: nothing kept
  mask_bs[-1, :] = False
  mask_bs[-1, slots - 1] = True  # one key only
  expected = cached.attend_part(
      q, k, v, jnp.repeat(jnp.asarray(mask_bs)[:, None], x, axis=1), jnp.float32, h**-0.5
  )
  got = jax.jit(lambda *a: cpu_decode.part(*a, h**-0.5))(q, k, v, jnp.asarray(mask_bs))
  for name, want, have in zip(("max", "sum", "out"), expected, got):
    np.testing.assert_allclose(have, want, rtol=2e-5, atol=2e-6, err_msg=name)
  assert (
      float(got[0][0].max()) == float(np.float32(-1e30)) and float(jnp.abs(got[2][0]).max()) == 0.0
  )
  np.testing.assert_allclose(got[1][-1], 1.0, rtol=1e-6)  # one key: exp(score - score)


def _layer_kv(rng, b, kv_heads, h, own_slots, prefix_slots, prompt_slots):
  own_k, own_v = _draw(rng, b, kv_heads, own_slots, h), _draw(rng, b, kv_heads, own_slots, h)
  prefix_k = _draw(rng, 1, kv_heads, prefix_slots, h)
  prefix_v = _draw(rng, 1, kv_heads, prefix_slots, h)
  prompt_k = _draw(rng, b, kv_heads, prompt_slots, h)
  prompt_v = _draw(rng, b, kv_heads, prompt_slots, h)
  index = jnp.asarray(rng.integers(0, own_slots - 1, b), jnp.int32)
  own_mask = jnp.arange(own_slots)[None, None, :] <= index[:, None, None]
  prompt_mask = jnp.asarray(rng.random((b, 1, prompt_slots)) < 0.7)
  return cached.LayerKV(
      own_k,
      own_v,
      index,
      own_mask,
      (prefix_k, prompt_k),
      (prefix_v, prompt_v),
      (jnp.ones((b, 1, prefix_slots), bool), prompt_mask),
  )


@needs_kernel
def test_a_decode_step_on_cpu_reads_own_keys_natively_and_a_shared_prefix_with_xla(monkeypatch):
  rng = np.random.default_rng(1)
  b, n, kv_heads, h = 10, 6, 2, 32  # more rows than MAX_ROWS_PER_TABLE share the prefix
  kv = _layer_kv(rng, b, kv_heads, h, own_slots=64, prefix_slots=40, prompt_slots=96)
  q, k, v = _draw(rng, b, 1, n, h), _draw(rng, b, 1, kv_heads, h), _draw(rng, b, 1, kv_heads, h)
  tables_read = []
  kernel = cpu_decode.part
  monkeypatch.setattr(
      cpu_decode, "part", lambda q, k, *a: tables_read.append(k.shape[0]) or kernel(q, k, *a)
  )
  step = lambda native: jax.jit(lambda *a: cached.cached_attention(*a, jnp.float32, native=native))(
      q, k, v, kv
  )
  expected_out, expected_kv = step(False)
  assert not tables_read
  out, new_kv = step(True)
  assert sorted(tables_read) == [b, b]  # the own buffer and the prompts; the prefix by XLA
  np.testing.assert_allclose(out, expected_out, rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(new_kv.k_bksh, expected_kv.k_bksh)


def test_only_a_step_on_one_cpu_device_takes_the_kernel():
  """XLA cannot split a custom call over a mesh (it would gather every row's cache to each
  device): a model resolved for several devices decodes with the XLA form."""
  model = Llama(LlamaConfig(40, 32, 1, 4, 2, head_dim=8, d_ff=64))
  devices = jax.devices()
  assert len(devices) >= 2
  assert dispatch.native_decode(for_devices(model, devices[:1]).cfg)
  assert not dispatch.native_decode(for_devices(model, devices[:2]).cfg)
  assert not dispatch.native_decode(model.cfg)  # not resolved: the portable XLA form
