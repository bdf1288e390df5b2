"""`python -m tailored_jax.bench.gpu_check [--out=FILE]`: the GPU check in one command, on any
machine with a GPU (its first device), ours and PyTorch side by side in one process:

- attention: the training attention `model.attention=auto` takes on this device in bfloat16
  (cuDNN's flash kernel on a GPU), the XLA form in bfloat16 and torch's
  `scaled_dot_product_attention` in bfloat16, at each preset's heads: forward and forward +
  backward milliseconds, and each one's output and query/key/value gradients against the XLA
  form in float32 (the largest difference over the reference's largest magnitude). The kernel
  passes where its errors are at most twice the bfloat16 XLA form's, or 1%.
- train step: SmolLM2-135M and Llama-3.2-1B (their config.json values) in bfloat16 over float32
  master weights and AdamW, LM loss: our jitted step and transformers' `LlamaForCausalLM` (its
  sdpa attention, torch's bf16 autocast) with `torch.optim.AdamW`: tokens/s, MFU against the
  device's data-sheet bf16 peak (`device_sheets`), peak device memory.

Prints JSON and writes it to `--out`. Without a GPU it stops with a line saying so;
`--allow_cpu` runs the same on the CPU (the test does, on tiny shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax import device_sheets
from tailored_jax.bench import attention, train_step
from tailored_jax.bench.common import PRESETS, record
from tailored_jax.models import for_devices
from tailored_jax.models.attention import dispatch
from tailored_jax.models.llama import Llama

DEFAULT_PRESETS = "smollm2_135m:8x2048,llama32_1b:4x2048"
DTYPE = "bfloat16"


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
  """The largest absolute difference over the reference's largest magnitude."""
  return float(np.max(np.abs(value - reference)) / max(np.max(np.abs(reference)), 1e-30))


def within_tolerance(kernel: dict, xla: dict, floor: float = 1e-2) -> bool:
  """A bf16 kernel's errors (against float32) are no more than twice the bf16 XLA form's, or
  `floor`: bf16 rounding, not a wrong mask or scale, explains them."""
  return all(
      kernel[key] <= max(2.0 * xla[key], floor) for key in ("output_error", "gradient_error")
  )


def attention_row(
    shape, heads: int, kv_heads: int, head_dim: int, repeats: int, devices, torch_device
):
  """One attention shape: `auto`'s kernel, XLA and torch in bf16 against float32 XLA."""
  choice = dispatch.choose("auto", devices, DTYPE, head_dim)
  q, k, v, weights = attention.inputs(shape.batch, shape.seq, heads, kv_heads, head_dim)
  with jax.default_matmul_precision("highest"):  # no TF32 in the reference
    reference = attention.ours(q, k, v, weights, 1, "xla", jnp.float32)
  arms = {
      "auto": attention.ours(q, k, v, weights, repeats, choice.implementation, jnp.bfloat16),
      "xla": attention.ours(q, k, v, weights, repeats, "xla", jnp.bfloat16),
      "torch_sdpa": attention.theirs(q, k, v, weights, repeats, torch_device, DTYPE),
  }
  row = {"auto_is": choice.implementation, "why": choice.reason}
  for name, arm in arms.items():
    row[name] = {
        "forward_ms": arm["forward_ms"],
        "forward_backward_ms": arm["forward_backward_ms"],
        "output_error": relative_error(arm["out"], reference["out"]),
        "gradient_error": max(
            relative_error(g, r) for g, r in zip(arm["grads"], reference["grads"])
        ),
    }
  row["auto_within_tolerance"] = within_tolerance(row["auto"], row["xla"])
  for other in ("xla", "torch_sdpa"):
    for key in ("forward", "forward_backward"):
      row[f"{other}_over_auto_{key}"] = row[other][f"{key}_ms"] / row["auto"][f"{key}_ms"]
  return row


def device_peak_bytes(device) -> int | None:
  """JAX's high-water mark of device memory in this process (None where not kept, e.g. CPU)."""
  stats = device.memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def train_row(preset: str, shape, repeats: int, remat: str, devices, torch_device) -> dict:
  """One preset's LM step, torch first (its cache emptied after), then ours."""
  import torch

  cfg = dataclasses.replace(PRESETS[preset], dtype=DTYPE, remat=remat, scan_layers=True)
  cfg = for_devices(Llama(cfg), devices).cfg
  n_params = train_step.parameter_count(cfg)
  work = train_step.Work.random(shape, cfg.vocab_size)
  on_cuda = torch_device.startswith("cuda")
  if on_cuda:
    torch.cuda.reset_peak_memory_stats()
  sides = {
      "torch": train_step.theirs(cfg, work, repeats, self_reflection=False, device=torch_device)
  }
  if on_cuda:
    sides["torch"]["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    gc.collect()
    torch.cuda.empty_cache()
  sides["ours"] = train_step.ours(cfg, work, repeats, self_reflection=False)
  sides["ours"]["peak_device_bytes_so_far"] = device_peak_bytes(devices[0])
  peaks = device_sheets.peaks_of(devices[0].device_kind)
  flops_per_token = train_step.model_flops_per_token(cfg, n_params, shape.seq)
  for result in sides.values():
    tokens_per_s = shape.batch * shape.seq / result["seconds_per_step"]
    result["tokens_per_s"] = tokens_per_s
    result["model_tflops"] = tokens_per_s * flops_per_token / 1e12
    result["mfu"] = result["model_tflops"] / peaks.bf16_tflops if peaks else None
  return {
      "parameters": n_params,
      "attention": cfg.attention,
      "remat": remat,
      **sides,
      "ours_over_torch_tokens_per_s": sides["ours"]["tokens_per_s"]
      / sides["torch"]["tokens_per_s"],
  }


def parse_presets(text: str) -> list[tuple[str, train_step.Shape]]:
  """'NAME:BxT,...' (presets of `bench.common.PRESETS`)."""
  out = []
  for item in text.split(","):
    name, _, shape = item.partition(":")
    if name not in PRESETS or not shape:
      raise ValueError(f"--presets: {item!r} is not NAME:BxT with NAME one of {sorted(PRESETS)}")
    try:
      out.append((name, train_step.Shape.parse(shape)))
    except ValueError as e:
      raise ValueError(f"--presets: {item!r}: {e}") from None
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--presets", default=DEFAULT_PRESETS, help="NAME:BxT, comma-separated")
  parser.add_argument("--attention_shape", default="4x2048", help="BxT, each preset's heads")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--remat", default="none", help="ours: model.remat (torch keeps all)")
  parser.add_argument("--out", default="", help="also write the JSON here")
  parser.add_argument("--allow_cpu", action="store_true", help="run on the CPU (tests)")
  args = parser.parse_args(argv)
  try:
    presets = parse_presets(args.presets)
    attention_shape = train_step.Shape.parse(args.attention_shape)
  except ValueError as e:
    parser.error(str(e))
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device
  devices = jax.devices()[:1]
  platform = devices[0].platform
  if platform != "gpu" and not args.allow_cpu:
    parser.error(
        f"no GPU: JAX's first device is {platform} ({devices[0].device_kind}); "
        "--allow_cpu runs the check there"
    )
  torch_device = "cuda" if platform == "gpu" else "cpu"
  heads_of = {}
  for name, _ in presets:
    cfg = PRESETS[name]
    heads_of.setdefault((cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), name)
  attention_rows = {
      f"{name} ({n}/{k} heads x {h})": attention_row(
          attention_shape, n, k, h, args.repeats, devices, torch_device
      )
      for (n, k, h), name in heads_of.items()
  }
  train_rows = {
      f"{name} {shape.batch}x{shape.seq}": train_row(
          name, shape, args.repeats, args.remat, devices, torch_device
      )
      for name, shape in presets
  }
  import torch

  peaks = device_sheets.peaks_of(devices[0].device_kind)
  result = record(
      "gpu_check",
      dtype=DTYPE,
      repeats=args.repeats,
      bf16_peak_tflops=peaks.bf16_tflops if peaks else None,
      torch_version=torch.__version__,
      torch_device=torch_device,
      attention_shape=str(attention_shape),
      attention=attention_rows,
      train_step=train_rows,
      passed=all(row["auto_within_tolerance"] for row in attention_rows.values()),
  )
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return result


if __name__ == "__main__":
  main()
