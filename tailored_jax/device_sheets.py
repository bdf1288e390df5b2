"""Accelerators' data-sheet peaks by JAX device kind: bf16 FLOP/s, memory bandwidth and the
chip-to-chip link, for MFU in logs and for ranking decode layouts by the compiler's numbers.
TPU figures come from `tpu_slices.CHIPS`; GPU figures from NVIDIA's data sheets (SXM parts:
dense bf16, HBM, NVLink per direction)."""

from __future__ import annotations

from typing import NamedTuple

from tailored_jax import tpu_slices


class Peaks(NamedTuple):
  bf16_tflops: float
  hbm_gb_per_s: float
  ici_gb_per_s: float  # chip-to-chip: ICI on TPUs, NVLink (one direction) on GPUs


_TPU_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5p": "v5p", "TPU v6 lite": "v6e"}
_GPUS = {
    "H100": Peaks(989.0, 3350.0, 450.0),
    "H200": Peaks(989.0, 4800.0, 450.0),
    "A100": Peaks(312.0, 2039.0, 300.0),
}


def peaks_of(device_kind: str) -> Peaks | None:
  """The data sheet of a device kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), None for CPUs and
  devices without one here."""
  for kind, name in _TPU_KINDS.items():
    if kind in device_kind:
      chip = tpu_slices.CHIPS[name]
      return Peaks(chip.bf16_tflops, chip.hbm_gb_per_s, chip.ici_gb_per_s)
  return next((peaks for kind, peaks in _GPUS.items() if kind in device_kind), None)
