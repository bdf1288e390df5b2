"""`python -m tailored_jax.bench.train_step [--config=configs/quickstart.py]`: steps/s and target
tokens/s of the jitted train step, LM-only, with self-reflection, and with self-reflection but
without the non-finite guard, measured side by side (interleaved repeats, medians)."""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax import sharding
from tailored_jax.bench.common import model_from_config, report
from tailored_jax.data.batching import LMBatch, ReflectionBatch
from tailored_jax.train.trainer import Trainer


def synthetic_batch(rng, batch: int, seq_len: int, prefix_len: int, cont_len: int, sr_rows: int,
                    vocab: int) -> tuple[LMBatch, ReflectionBatch]:
  tokens = rng.integers(3, vocab, (batch, seq_len + 1)).astype(np.int32)
  ones = np.ones((batch, seq_len), bool)
  lm = LMBatch(tokens[:, :-1], tokens[:, 1:], ones, ones, ones.astype(np.float32))
  reflection = ReflectionBatch(
      rng.integers(3, vocab, (sr_rows, prefix_len)).astype(np.int32),
      np.ones((sr_rows, prefix_len), bool),
      rng.integers(3, vocab, (sr_rows, 3, cont_len)).astype(np.int32),
      np.ones((sr_rows, 3, cont_len), bool), np.ones((sr_rows,), np.float32))
  return lm, reflection


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--vocab_size", type=int, default=600)
  parser.add_argument("--seq_len", type=int, default=112)
  parser.add_argument("--prefix_len", type=int, default=48)
  parser.add_argument("--continuation_len", type=int, default=80)
  parser.add_argument("--sr_rows", type=int, default=0,
                      help="rows with the triplet loss (0: every row of the batch)")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  cfg, model, params = model_from_config(args.config, args.vocab_size)
  mesh = sharding.make_mesh(cfg)
  trainer = Trainer(model, cfg.train, mesh)
  unguarded_cfg = cfg.train.copy_and_resolve_references()
  unguarded_cfg.max_nonfinite_steps = 0
  unguarded = Trainer(model, unguarded_cfg, mesh)
  b = cfg.train.batch_size
  sr_rows = args.sr_rows or b
  lm, reflection = (trainer.put_batch(x) for x in synthetic_batch(np.random.default_rng(
      0), b, args.seq_len, args.prefix_len, args.continuation_len, sr_rows, args.vocab_size))
  variants = {
      "lm": (trainer, None), "lm_plus_self_reflection": (trainer, reflection),
      "lm_plus_self_reflection_without_nonfinite_guard": (unguarded, reflection)
  }
  states = {name: trainer.new_state(jax.tree.map(jnp.copy, params)) for name in variants}
  times = {name: [] for name in variants}
  for name, (owner, rows) in variants.items():  # compile and warm up each variant
    states[name], metrics = owner.step_fn()(states[name], lm, rows)
    jax.block_until_ready(metrics)
  for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
    for name, (owner, rows) in variants.items():
      start = time.perf_counter()
      states[name], metrics = owner.step_fn()(states[name], lm, rows)  # the step donates it
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
  results = {}
  for name, samples in times.items():
    seconds = float(np.median(samples))
    results[name] = {
        "seconds_per_step": seconds, "steps_per_s": 1 / seconds,
        "target_tokens_per_s": b * args.seq_len / seconds
    }
  n_params = sum(x.size for x in jax.tree.leaves(params))
  seconds = lambda name: results[name]["seconds_per_step"]
  report(
      "train_step", config=args.config, parameters=n_params, batch=b, seq_len=args.seq_len,
      self_reflection_rows=sr_rows, repeats=args.repeats, **results,
      self_reflection_cost_ratio=seconds("lm_plus_self_reflection") / seconds("lm"),
      nonfinite_guard_cost_ratio=(seconds("lm_plus_self_reflection")
                                  / seconds("lm_plus_self_reflection_without_nonfinite_guard")))


if __name__ == "__main__":
  main()
