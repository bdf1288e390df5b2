"""The machine a benchmark ran on, recorded in its JSON: a ratio between XLA and torch depends
on the CPU (on one AMD and one Intel CPU here they swapped places), its vector and matrix
extensions, torch's BLAS/oneDNN and every library's version."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re

# The ISA extensions that decide which matmul kernels XLA and torch can use.
X86_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
ARM_FEATURES = ("asimd", "sve", "sve2", "bf16", "i8mm", "sme")
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers")


def _cpuinfo() -> dict[str, str]:
  """The first processor's /proc/cpuinfo fields (empty where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      first = f.read().split("\n\n")[0]
  except OSError:
    return {}
  return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


def cpu() -> dict:
  """Model, cores (all, and those this process may use) and the extensions that matter."""
  info = _cpuinfo()
  flags = set((info.get("flags") or info.get("Features") or "").split())
  wanted = X86_FLAGS if platform.machine() in ("x86_64", "AMD64") else ARM_FEATURES
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
      "model": info.get("model name") or info.get("CPU part") or platform.processor() or "unknown",
      # x86 family/model numbers tell CPU generations apart where a VM's model name does not
      "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
      "architecture": platform.machine(),
      "cores": os.cpu_count(),
      "usable_cores": usable,
      "isa": [f for f in wanted if f in flags],
  }


def torch_backends() -> dict:
  """torch's BLAS and oneDNN, as its build reports them (empty without torch)."""
  try:
    import torch
  except ImportError:
    return {}
  shown = torch.__config__.show()
  blas = re.search(r"BLAS_INFO=(\w+)", shown)
  onednn = re.search(r"(?:oneDNN|MKL-DNN)[^\n]*?v?(\d+\.\d+(?:\.\d+)?)", shown)
  return {
      "blas": blas.group(1) if blas else "unknown",
      "onednn": onednn.group(1) if onednn else None,
      "mkldnn_enabled": bool(torch.backends.mkldnn.is_available()),
      "threads": torch.get_num_threads(),
  }


def versions() -> dict:
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def machine(devices) -> dict:
  """Everything above, and the accelerators the benchmark's arrays lived on."""
  devices = list(devices)
  return {
      "cpu": cpu(),
      "torch": torch_backends(),
      "versions": versions(),
      "devices": {
          "platform": devices[0].platform,
          "kind": getattr(devices[0], "device_kind", ""),
          "count": len(devices),
      },
  }
