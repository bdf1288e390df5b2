"""`python -m tailored_jax.bench.decode [--config=configs/quickstart.py]`: generated tokens/s of
the KV-cache decoder (prefill once, k samples per prompt), against recomputing the whole
sequence for every new token, measured side by side on the same model and prompts."""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax.bench.common import model_from_config, report, timed
from tailored_jax.sample.decode import Decoder, StopTables
from tailored_jax.sample.sampling import SamplingConfig


def recompute_generate(model, params, prompt_bp, new_tokens: int):
  """Greedy decoding without a cache: one full forward over the growing sequence per token."""
  b, p = prompt_bp.shape
  tokens = jnp.concatenate([prompt_bp, jnp.zeros((b, new_tokens), jnp.int32)], axis=1)
  positions = jnp.broadcast_to(jnp.arange(p + new_tokens), tokens.shape)

  def body(i, tokens):
    valid = jnp.arange(p + new_tokens)[None, :] < p + i
    logits, _, _ = model.apply({"params": params}, tokens, positions,
                               jnp.broadcast_to(valid, tokens.shape))
    nxt = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(jnp.int32)
    return tokens.at[:, p + i].set(nxt)

  return jax.lax.fori_loop(0, new_tokens, body, tokens)[:, p:]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--vocab_size", type=int, default=600)
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--prompt_len", type=int, default=48)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  _, model, params = model_from_config(args.config, args.vocab_size)
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(3, args.vocab_size, (args.prompts, args.prompt_len)),
                        jnp.int32)
  valid = jnp.ones(prompts.shape, bool)
  decoder = Decoder(model, StopTables.never_stop(args.vocab_size))
  results = {}
  for name, samples, sampling in (("kv_cache_greedy", 1, SamplingConfig()),
                                  ("kv_cache_sampled_k", args.samples, SamplingConfig(1.0, 50,
                                                                                      1.0))):
    seconds = timed(
        lambda: jax.block_until_ready(
            decoder(params, prompts, valid, jax.random.PRNGKey(0), max_new_tokens=args.new_tokens,
                    num_samples=samples, sampling=sampling)), args.repeats)
    tokens = args.prompts * samples * args.new_tokens
    results[name] = {
        "sequences": args.prompts * samples, "seconds": seconds,
        "generated_tokens_per_s": tokens / seconds
    }
  recompute = jax.jit(lambda p, t: recompute_generate(model, p, t, args.new_tokens))
  seconds = timed(lambda: jax.block_until_ready(recompute(params, prompts)), args.repeats)
  results["recompute_greedy"] = {
      "sequences": args.prompts, "seconds": seconds,
      "generated_tokens_per_s": args.prompts * args.new_tokens / seconds
  }
  cached, again = decoder(params, prompts, valid, jax.random.PRNGKey(0),
                          max_new_tokens=args.new_tokens, num_samples=1,
                          sampling=SamplingConfig())[0], recompute(params, prompts)
  report(
      "decode", config=args.config, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
      **results, same_greedy_tokens=bool((np.asarray(cached) == np.asarray(again)).all()),
      kv_cache_speedup=(results["recompute_greedy"]["seconds"]
                        / results["kv_cache_greedy"]["seconds"]))


if __name__ == "__main__":
  main()
