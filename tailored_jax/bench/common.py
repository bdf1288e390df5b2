"""Helpers for the benchmarks: a model from a config file, timing, and the JSON report."""
from __future__ import annotations

import json
import time

import flax.linen as nn
import jax

from tailored_jax import config_lib
from tailored_jax.models import build_model, layers


def model_from_config(path: str, vocab_size: int):
  cfg = config_lib.from_file(path)
  model = build_model(cfg.model, vocab_size)
  params = nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(0)))
  return cfg, model, params


def timed(fn, repeats: int) -> float:
  """Median seconds of `fn()` (which must block) over `repeats` runs, after one warm-up."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def report(name: str, **fields) -> None:
  device = jax.devices()[0]
  print(
      json.dumps(
          {
              "benchmark": name, "backend": jax.default_backend(), "device": getattr(
                  device, "device_kind", str(device)), "devices": jax.device_count(), **fields
          }, indent=2))
