"""LoRA adapters as a Hugging Face PEFT adapter directory (`adapter_config.json`,
`adapter_model.safetensors`): what `peft.PeftModel.from_pretrained(base model, DIR)` loads.

PEFT's lora_A is [r, in] and lora_B [out, r] over the HF weight's flattened input and output;
ours are A [in..., r] and B [r, out...] over our weight's axes. Each HF weight is our weight
flattened and transposed (checked per tensor), so A and B flatten and transpose the same way.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from tailored_jax.models import quantize
from tailored_jax.models.layers import is_stacked, tree_get, unstack_layers
from tailored_jax.student_io.hf_io import tensor_table


def peft_tensors(params, cfg) -> tuple[dict[str, np.ndarray], list[str]]:
  """(PEFT's adapter tensors by name, the HF module names adapted) of our params with adapters."""
  if is_stacked(params):
    params = unstack_layers(params)
  tensors, modules = {}, set()
  for name, entry in tensor_table(cfg).items():
    for part in entry.parts:  # a fused HF tensor: one PEFT module for several adapters of ours
      *parent, leaf = part
      if f"{leaf}_lora_a" in tree_get(params, parent):
        raise ValueError(
            f"{name}: fused in the HF layout, so its adapters ({leaf}, ...) have no PEFT form; "
            "adapt other projections (model.lora_targets) or export merged weights"
        )
    *parent, leaf = entry.path
    node = tree_get(params, parent)
    if not name.endswith(".weight") or f"{leaf}_lora_a" not in node:
      continue
    a = np.asarray(node[f"{leaf}_lora_a"], np.float32)
    b = np.asarray(node[f"{leaf}_lora_b"], np.float32)
    w = node[leaf]
    if quantize.is_quantized(w):  # a QLoRA base: its layout checked on the dequantised weight
      w = quantize.dequantize(w, quantize.INPUT_AXES[leaf], cfg.base_quantization, np.float32)
    w = np.asarray(w, np.float32)
    fan_in, rank = math.prod(a.shape[:-1]), a.shape[-1]
    if not np.array_equal(entry.to_hf(w), w.reshape(fan_in, -1).T):
      raise ValueError(f"{name}: not a transposed matrix of ours; its adapter cannot be exported")
    module = "base_model.model." + name[: -len(".weight")]
    tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(fan_in, rank).T)
    tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
    modules.add(name.split(".")[-2])
  return tensors, sorted(modules)


def adapter_config(cfg, modules: list[str], base_model: str) -> dict:
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "r": cfg.lora_rank,
      "lora_alpha": cfg.lora_alpha,
      "lora_dropout": cfg.lora_dropout,
      "target_modules": modules,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "inference_mode": True,
  }


def save_peft_dir(directory: str, params, cfg, base_model: str) -> None:
  from safetensors.numpy import save_file

  tensors, modules = peft_tensors(params, cfg)
  if not tensors:
    raise ValueError("the weights hold no LoRA adapters (model.lora_rank was 0)")
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(adapter_config(cfg, modules, base_model), f, indent=2)
