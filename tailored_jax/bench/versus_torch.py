"""`python -m tailored_jax.bench.versus_torch [--model=llama_34m] [--shapes=8x128,8x256,8x512]`:
our jitted LM train step against transformers' `LlamaForCausalLM` + `torch.optim.AdamW` on the
same config and the same batch, side by side in one process (float32, AdamW, median of
`--repeats` after a warm-up). Prints JSON: tokens/s both, the ratio, compile/first-call time,
model FLOP/s as a share of each library's measured matmul peak, and each side's peak resident
memory (the process's high-water mark, reset before each side; Linux).

Model presets carry public config.json values (SmolLM2-135M) or a stated small shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tailored_jax import config_lib, sharding
from tailored_jax.bench.common import report
from tailored_jax.data.batching import LMBatch
from tailored_jax.models import layers
from tailored_jax.models.llama import Llama, LlamaConfig
from tailored_jax.train.trainer import Trainer

PRESETS = {
    # For the benchmark's own test.
    "tiny": LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, d_ff=128),
    # A 34M-class LLaMA: d 512, 8 layers, MHA, SwiGLU 1536, 16k vocabulary, tied.
    "llama_34m": LlamaConfig(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                             head_dim=64, d_ff=1536, rope_theta=10000.0, norm_eps=1e-5,
                             tie_embeddings=True),
    # HuggingFaceTB/SmolLM2-135M config.json.
    "smollm2_135m": LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                head_dim=64, d_ff=1536, rope_theta=100000.0, norm_eps=1e-5,
                                tie_embeddings=True),
}


def torch_model(cfg: LlamaConfig):
  import torch
  import transformers
  hf = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                                head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                                rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                                max_position_embeddings=4096)
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(hf).train()


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


def matmul_peak_gflops(side: str, n: int = 1024, repeats: int = 10) -> float:
  """Float32 [n, n] @ [n, n] GFLOP/s of jnp or torch on this machine (median)."""
  if side == "ours":
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    run = lambda: matmul(a).block_until_ready()
  else:
    import torch
    a = torch.randn(n, n)
    run = lambda: a @ a
  return 2 * n**3 / median_seconds(run, repeats)[1] / 1e9


def model_flops_per_token(cfg: LlamaConfig, n_params: int, seq: int) -> float:
  """Training FLOPs per token: 6 · parameters, plus causal attention's scores and weighted sum
  (6 · layers · seq · heads · head_dim: half of the full square's 12)."""
  return 6.0 * n_params + 6.0 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim


def _reset_peak_rss() -> int:
  """Resets the process's resident high-water mark; returns the current resident bytes."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def with_peak_memory(run):
  """`run()`'s result with its peak resident bytes, and the peak above the bytes at its start."""
  start = _reset_peak_rss()
  result = run()
  peak = _status_bytes("VmHWM")
  return dict(result, peak_rss_gb=peak / 1e9, peak_rss_above_start_gb=(peak - start) / 1e9)


def train_cfg(lr: float, loss_chunk_tokens: int = 0) -> ml_collections.ConfigDict:
  t = config_lib.base_config().train
  t.lr, t.warmup_steps, t.loss_chunk_tokens = lr, 0, loss_chunk_tokens
  return t


def ours(cfg: LlamaConfig, tokens: np.ndarray, repeats: int, loss_chunk_tokens: int = 0) -> dict:
  mesh = sharding.make_mesh(
      ml_collections.ConfigDict({"mesh": dict(data=-1, fsdp=1, tensor=1, num_devices=1)}))
  model = Llama(cfg)
  trainer = Trainer(model, train_cfg(1e-5, loss_chunk_tokens), mesh)
  state = {"s": trainer.new_state(trainer.init_params(0))}
  ones = np.ones(tokens[:, :-1].shape, bool)
  lm = trainer.put_batch(LMBatch(tokens[:, :-1], tokens[:, 1:], ones, ones,
                                 ones.astype(np.float32)))
  step_fn = trainer.step_fn()

  def step():
    state["s"], metrics = step_fn(state["s"], lm, None)
    jax.block_until_ready(metrics)

  first, seconds = median_seconds(step, repeats)
  return {"first_call_s": first, "seconds_per_step": seconds}


def theirs(cfg: LlamaConfig, tokens: np.ndarray, repeats: int, device: str = "cpu") -> dict:
  import torch
  model = torch_model(cfg).to(device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.01)
  inputs = torch.tensor(tokens[:, :-1], dtype=torch.long, device=device)
  targets = torch.tensor(tokens[:, 1:], dtype=torch.long, device=device)

  def step():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device != "cpu":
      torch.cuda.synchronize()

  first, seconds = median_seconds(step, repeats)
  return {"first_call_s": first, "seconds_per_step": seconds}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="llama_34m", choices=sorted(PRESETS))
  parser.add_argument("--shapes", default="8x128,8x256,8x512", help="BATCHxSEQ,...")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch_device", default="cpu", help="cpu, or cuda beside a JAX GPU")
  parser.add_argument("--remat", default="none", choices=config_lib.REMAT_POLICIES,
                      help="ours: what each block keeps for the backward pass")
  parser.add_argument("--scan_layers", action="store_true", help="ours: nn.scan over layers")
  parser.add_argument("--loss_chunk_tokens", type=int, default=0,
                      help="ours: LM-head logits this many positions at a time (0: all)")
  parser.add_argument("--side", default="both", choices=["both", "ours", "torch"],
                      help="one side alone, e.g. to read its peak RSS with /usr/bin/time -v")
  args = parser.parse_args(argv)
  cfg = dataclasses.replace(PRESETS[args.model], remat=args.remat, scan_layers=args.scan_layers)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layers.abstract_params(Llama(cfg))))
  rows = {}
  sides_run = ("ours", "torch") if args.side == "both" else (args.side,)
  peaks = {side: matmul_peak_gflops(side) for side in sides_run}
  for shape in args.shapes.split(","):
    b, t = (int(x) for x in shape.split("x"))
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    sides = {
        "ours": functools.partial(ours, loss_chunk_tokens=args.loss_chunk_tokens),
        "torch": functools.partial(theirs, device=args.torch_device)
    }
    if args.side != "both":
      sides = {args.side: sides[args.side]}
    row = {
        side: with_peak_memory(lambda run=run: run(cfg, tokens, args.repeats))
        for side, run in sides.items()
    }
    for side in row:
      tokens_per_s = b * t / row[side]["seconds_per_step"]
      row[side]["tokens_per_s"] = tokens_per_s
      # the first call's excess over a steady step: compilation on our side
      row[side]["first_call_excess_s"] = row[side]["first_call_s"] - row[side]["seconds_per_step"]
      flops = tokens_per_s * model_flops_per_token(cfg, n_params, t) / 1e9
      row[side]["model_gflops"] = flops
      row[side]["share_of_matmul_peak"] = flops / peaks[side]
    if len(row) == 2:
      row["ours_over_torch_tokens_per_s"] = (row["ours"]["tokens_per_s"]
                                             / row["torch"]["tokens_per_s"])
    rows[shape] = row
  import torch
  report("versus_torch", model=args.model, parameters=n_params, dtype="float32",
         ours_remat=args.remat, ours_scan_layers=args.scan_layers,
         ours_loss_chunk_tokens=args.loss_chunk_tokens, torch_threads=torch.get_num_threads(),
         torch_device=args.torch_device, torch_version=torch.__version__, repeats=args.repeats,
         matmul_peak_gflops=peaks, shapes=rows)


if __name__ == "__main__":
  main()
