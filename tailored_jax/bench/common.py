"""Helpers for the benchmarks: model presets, timing, the JSON report,
and transformers' twin of a preset (torch is imported only there)."""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from tailored_jax.bench.machine import machine
from tailored_jax.student_io import hf_io
from tailored_jax.models.llama import LlamaConfig
from tailored_jax.plan import PRESETS as PLAN_PRESETS

# Model presets: public config.json values (SmolLM2-135M) or a stated small shape.
PRESETS = {
    # For the benchmark's own test.
    "tiny": LlamaConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
    ),
    # A 34M-class LLaMA: d 512, 8 layers, MHA, SwiGLU 1536, 16k vocabulary, tied.
    "llama_34m": LlamaConfig(
        vocab_size=16384,
        d_model=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=8,
        head_dim=64,
        d_ff=1536,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    ),
    # HuggingFaceTB/SmolLM2-135M config.json.
    "smollm2_135m": LlamaConfig(**PLAN_PRESETS["smollm2_135m"][1]),  # its config.json values
    # meta-llama/Llama-3.2-1B config.json values
    "llama32_1b": LlamaConfig(**PLAN_PRESETS["llama32_1b"][1]),
}


def record(name: str, **fields) -> dict:
  """A benchmark's result with the machine and devices it ran on (`bench.machine`)."""
  devices = jax.devices()
  return {
      "benchmark": name,
      "backend": devices[0].platform,
      "device": getattr(devices[0], "device_kind", str(devices[0])),
      "devices": len(devices),
      "machine": machine(devices),
      **fields,
  }


def report(name: str, **fields) -> None:
  """The benchmark's JSON (`record`) on stdout."""
  print(json.dumps(record(name, **fields), indent=2))


def median_seconds(step, repeats: int) -> tuple[float, float]:
  """(first call seconds, median of `repeats` later calls)."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return first, float(np.median(times))


def torch_model(cfg: LlamaConfig):
  import torch
  import transformers

  rope_scaling = None
  if cfg.rope_scaling == "llama3":
    rope_scaling = {
        "rope_type": "llama3",
        "factor": cfg.rope_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_positions,
    }
  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model,
      intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim,
      rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=4096,
      rope_scaling=rope_scaling,
  )
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(hf).train()


def torch_twin(cfg, params, device: str):
  """transformers' LlamaForCausalLM holding our weights, for inference."""
  import torch

  model = torch_model(cfg)
  state = {name: torch.tensor(array) for name, array in hf_io.to_hf(params, cfg).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or [m for m in missing if m != "lm_head.weight"]:
    raise RuntimeError(f"weights did not transfer: missing {missing}, unexpected {unexpected}")
  model.generation_config.eos_token_id = None
  model.generation_config.bos_token_id = None
  return model.to(device).eval()
