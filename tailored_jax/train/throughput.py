"""Training throughput: tokens/s over a window of steps, model FLOP/s and the MFU against the
chip's data-sheet peak (or, on CPU, the measured matmul peak). Chosen by the devices the step
runs on, never by the default backend."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax import device_sheets


def peak_tflops(device_kind: str) -> float | None:
  """A chip's dense bf16 peak TFLOP/s from its data sheet (`device_sheets`), None without one."""
  peaks = device_sheets.peaks_of(device_kind)
  return peaks.bf16_tflops if peaks else None


@functools.cache
def measured_matmul_tflops(dtype: str = "float32", n: int = 1024) -> float:
  """The default device's [n, n] @ [n, n] TFLOP/s in `dtype`, median of 5 after a warm-up,
  measured once per process: the MFU's peak where no data sheet gives one (CPUs)."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  seconds = []
  for _ in range(5):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    seconds.append(time.perf_counter() - start)
  return 2 * n**3 / float(np.median(seconds)) / 1e12


@dataclasses.dataclass(frozen=True)
class ModelFlops:
  per_device_tflops: float
  mfu: float | None  # a fraction of `peak`
  peak: str  # what the MFU is measured against

  def text(self) -> str:
    mfu = f", MFU {100 * self.mfu:.1f}% of {self.peak}" if self.mfu is not None else ""
    return f"{self.per_device_tflops:.3g} model TFLOP/s per device{mfu}"


def model_flops(num_params: int, tokens_per_s: float, devices, dtype: str = "float32"):
  """Achieved model FLOP/s per device (6 · parameters · tokens processed per second, attention
  not counted) on `devices`, and the MFU against the chip's dense bf16 peak where it is known,
  or on CPU against this machine's measured matmul peak in the compute dtype."""
  devices = list(devices)
  per_device = 6.0 * num_params * tokens_per_s / len(devices) / 1e12
  peak = peak_tflops(getattr(devices[0], "device_kind", ""))
  if peak:
    return ModelFlops(per_device, per_device / peak, "bf16 peak")
  if getattr(devices[0], "platform", "") == "cpu":
    return ModelFlops(
        per_device, per_device / measured_matmul_tflops(dtype), f"the measured {dtype} matmul peak"
    )
  return ModelFlops(per_device, None, "")


class Window:
  """Steps and tokens since the last read: the rates of a log line."""

  def __init__(self, clock=time.time):
    self.clock = clock
    self.reset()

  def reset(self) -> None:
    self.started, self.steps, self.target_tokens, self.input_tokens = self.clock(), 0, 0, 0

  def add(self, target_tokens: int, input_tokens: int) -> None:
    self.steps += 1
    self.target_tokens += target_tokens
    self.input_tokens += input_tokens

  def rates(self) -> tuple[float, float, float]:
    """(steps/s, target tokens/s, input tokens/s) since the last reset."""
    elapsed = max(self.clock() - self.started, 1e-9)
    return self.steps / elapsed, self.target_tokens / elapsed, self.input_tokens / elapsed
