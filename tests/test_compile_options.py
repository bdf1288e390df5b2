"""XLA options chosen by the devices a step compiles for: the CPU copy-insertion option reaches
the CPU train step (and keeps the scan's stacked weights from being copied), never XLA_FLAGS."""

import dataclasses
import os
import subprocess
import sys

import jax

from tailored_jax import compile_options
from tests.test_model_and_decode import CFG
from tests.test_scan_and_remat import _compiled_lm_step


def test_cpu_devices_get_the_option_and_other_platforms_none():
  assert compile_options.for_devices(jax.devices()[:2]) == compile_options.CPU_OPTIONS
  tpu = type("FakeDevice", (), {"platform": "tpu"})()
  assert compile_options.for_devices([tpu, tpu]) == {}


def test_an_option_this_xla_does_not_know_is_left_out(monkeypatch):
  monkeypatch.setattr(
      compile_options,
      "CPU_OPTIONS",
      {**compile_options.CPU_OPTIONS, "xla_cpu_no_such_option_here": True},
  )
  assert compile_options.for_devices(jax.devices()[:1]) == {
      "xla_cpu_copy_insertion_use_region_analysis": True
  }


def test_the_option_keeps_the_scanned_weights_from_being_copied(monkeypatch):
  """The donated train state's stacked weights, read by the layer scan, are copied by XLA:CPU's
  default copy insertion: more temporaries without the option."""
  cfg = dataclasses.replace(CFG, n_layers=4, d_model=64, d_ff=256, scan_layers=True, remat="full")
  temp = lambda: _compiled_lm_step(cfg, 2, 16).memory_analysis().temp_size_in_bytes
  with_option = temp()
  monkeypatch.setattr(compile_options, "CPU_OPTIONS", {})
  without = temp()
  one_mlp_matrix_per_layer = 4 * 64 * 256 * 4  # bytes (measured: one such copy per layer)
  assert without - with_option >= one_mlp_matrix_per_layer, (without, with_option)


def test_importing_the_package_leaves_xla_flags_alone():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [
          sys.executable,
          "-c",
          "import os, tailored_jax.main; print(repr(os.environ.get('XLA_FLAGS')))",
      ],
      env=env,
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  assert out.strip() == "None"
