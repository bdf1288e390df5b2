"""`python -m tailored_jax.bench.decode [--model=llama_34m]`: our KV-cache decoder against
transformers' `generate` on the same weights, prompts, batch and token budget, side by side in
one process (float32; every row runs the full budget). Prints JSON. With `--model=PATH` (a GGUF
file or an HF directory) and `--data_path`, a real student on the evaluation's own prompts
instead (`bench.decode_student`).

- greedy: batch 32, 64-token prompts, 64 new tokens: new tokens/s both, and whether the tokens
  are the same; our sampled decoding (k samples, top-k 50) on the same number of rows.
- exam: the GSM8K-shaped exam (16 questions after one shared ~450-token few-shot prefix, ~60
  question tokens each, k=4 samples at T=1.0, top-k 50, 128 new tokens): wall time of
  `generate(num_return_sequences=4)`, ours prefilling the whole prompts, and ours with the
  prefix prefilled once and shared.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax.bench.common import PRESETS, median_seconds, report, torch_twin
from tailored_jax.data.batching import round_up
from tailored_jax.models import for_devices, layers
from tailored_jax.models.llama import Llama
from tailored_jax.sample.decode import Decoder, StopTables
from tailored_jax.sample.runner import left_pad
from tailored_jax.sample.sampling import SamplingConfig, sample_keys

PAD = 0


def hf_generate(
    model, rows: list, new_tokens: int, samples: int, sampling, device, pad_id: int = PAD
):
  """transformers' generate on left-padded prompts; returns (call, new tokens [rows*k, new])."""
  import torch

  length = round_up(max(len(r) for r in rows), 32)
  tokens, valid = left_pad([list(r) for r in rows], length, len(rows), pad_id)
  ids = torch.tensor(tokens, dtype=torch.long, device=device)
  mask = torch.tensor(valid, dtype=torch.long, device=device)
  options = dict(
      max_new_tokens=new_tokens,
      min_new_tokens=new_tokens,
      pad_token_id=pad_id,
      num_return_sequences=samples,
  )
  if sampling.temperature:
    options.update(
        do_sample=True,
        temperature=sampling.temperature,
        top_k=sampling.top_k or None,
        top_p=sampling.top_p,
    )
  else:
    options.update(do_sample=False, top_k=None, top_p=None, temperature=None)

  def call():
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, **options)
    if device != "cpu":
      torch.cuda.synchronize()
    return out[:, length:].cpu().numpy()

  return call


def ours_generate(
    decoder,
    params,
    rows: list,
    new_tokens: int,
    samples: int,
    sampling,
    shared: int = 0,
    pad_id: int = PAD,
):
  """Our decoder on the same prompts; with `shared` > 0, their first `shared` tokens (the same in
  every row) are prefilled once and shared. Returns (call, new tokens [rows*k, new])."""
  own = [r[shared:] for r in rows]
  length = round_up(max(len(r) for r in own), 32)
  tokens, valid = left_pad([list(r) for r in own], length, len(rows), pad_id)
  keys = sample_keys(jax.random.PRNGKey(0), jnp.arange(len(rows), dtype=jnp.uint32), samples)
  tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
  prefix_tokens = jnp.asarray(np.asarray(rows[0][:shared]), jnp.int32)

  def call():
    prefix = decoder.prefill(params, prefix_tokens) if shared else None
    out, _ = decoder(
        params,
        tokens,
        valid,
        keys,
        max_new_tokens=new_tokens,
        num_samples=samples,
        sampling=sampling,
        prefix=prefix,
    )
    return np.asarray(out)

  return call


def timed_row(call, repeats: int, new_tokens_total: int) -> dict:
  first, seconds = median_seconds(call, repeats)
  return {"first_call_s": first, "seconds": seconds, "new_tokens_per_s": new_tokens_total / seconds}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument(
      "--model", default="llama_34m", help=f"a preset ({', '.join(sorted(PRESETS))}) or a path"
  )
  parser.add_argument("--greedy_batch", type=int, default=32)
  parser.add_argument("--greedy_prompt", type=int, default=64)
  parser.add_argument("--greedy_new", type=int, default=64)
  parser.add_argument("--exam_questions", type=int, default=16)
  parser.add_argument("--exam_prefix", type=int, default=450)
  parser.add_argument("--exam_question", type=int, default=60, help="mean; ±10 across questions")
  parser.add_argument("--exam_samples", type=int, default=4)
  parser.add_argument("--exam_new", type=int, default=128)
  parser.add_argument("--top_k", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--torch_device", default="cpu", help="cpu, or cuda beside a JAX GPU")
  parser.add_argument("--parts", default="greedy,exam", help="which comparisons to run")
  student = parser.add_argument_group("a real student (--model=PATH)")
  student.add_argument("--data_path", default="", help="the task's data files")
  student.add_argument("--task", default="gsm8k")
  student.add_argument("--prompts", type=int, default=32, help="greedy rows")
  student.add_argument("--new_tokens", type=int, default=128)
  student.add_argument("--sampled_prompts", type=int, default=8)
  student.add_argument("--samples", type=int, default=4)
  student.add_argument("--eval_prompts", type=int, default=64, help="the evaluation part's")
  student.add_argument("--eval_batch", type=int, default=32)
  student.add_argument(
      "--kv_cache_dtype",
      default="bfloat16",
      help="the evaluation part also decodes continuously with this KV cache dtype and scores"
      " both ('' to skip)",
  )
  args = parser.parse_args(argv)
  if args.model not in PRESETS:
    if not os.path.exists(args.model) or not args.data_path:
      parser.error(
          f"--model={args.model}: not a preset; a real student needs its path and --data_path"
      )
    if args.parts == "greedy,exam":
      args.parts = "greedy,sampled,evaluation"
    from tailored_jax.bench import decode_student

    return decode_student.run(args)
  parts = set(args.parts.split(","))
  import torch

  cfg = PRESETS[args.model]
  model = for_devices(Llama(cfg), jax.devices()[:1])  # as a run compiles it for this device
  params = nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(0)))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  twin = torch_twin(cfg, params, args.torch_device)
  decoder = Decoder(model, StopTables.never_stop(cfg.vocab_size, PAD))
  rng = np.random.default_rng(0)

  prompts = [rng.integers(3, cfg.vocab_size, args.greedy_prompt) for _ in range(args.greedy_batch)]
  k = args.exam_samples
  results = {}
  if "greedy" in parts:
    results["greedy"] = {
        "batch": args.greedy_batch,
        "prompt_tokens": args.greedy_prompt,
        "new_tokens": args.greedy_new,
        **compare_greedy(args, decoder, params, twin, prompts),
    }
  if "exam" in parts:
    results["exam"] = {
        "questions": args.exam_questions,
        "prefix_tokens": args.exam_prefix,
        "question_tokens": args.exam_question,
        "samples": k,
        "top_k": args.top_k,
        "new_tokens": args.exam_new,
        **compare_exam(args, decoder, params, twin, rng),
    }
  report(
      "decode",
      model=args.model,
      parameters=n_params,
      dtype="float32",
      torch_threads=torch.get_num_threads(),
      torch_device=args.torch_device,
      torch_version=torch.__version__,
      repeats=args.repeats,
      **results,
      compilations=decoder.compilations,
  )


def compare_greedy(args, decoder, params, twin, prompts) -> dict:
  """Greedy new tokens/s, ours and transformers'; our sampled decoding on as many rows."""
  greedy, sampled = SamplingConfig(), SamplingConfig(1.0, args.top_k, 1.0)
  total = args.greedy_batch * args.greedy_new
  ours_call = ours_generate(decoder, params, prompts, args.greedy_new, 1, greedy)
  hf_call = hf_generate(twin, prompts, args.greedy_new, 1, greedy, args.torch_device)
  ours_tokens, hf_tokens = ours_call(), hf_call()
  k = args.exam_samples
  per_prompt = max(1, args.greedy_batch // k)
  sampled_call = ours_generate(decoder, params, prompts[:per_prompt], args.greedy_new, k, sampled)
  greedy_rows = {
      "ours": timed_row(ours_call, args.repeats, total),
      "transformers": timed_row(hf_call, args.repeats, total),
      "ours_sampled": timed_row(sampled_call, args.repeats, per_prompt * k * args.greedy_new),
      "same_tokens_rows": int((ours_tokens == hf_tokens).all(axis=1).sum()),
      "rows": args.greedy_batch,
  }
  greedy_rows["ours_over_transformers"] = (
      greedy_rows["ours"]["new_tokens_per_s"] / greedy_rows["transformers"]["new_tokens_per_s"]
  )
  greedy_rows["ours_sampled_over_ours_greedy"] = (
      greedy_rows["ours_sampled"]["new_tokens_per_s"] / greedy_rows["ours"]["new_tokens_per_s"]
  )
  return greedy_rows


def compare_exam(args, decoder, params, twin, rng) -> dict:
  """Wall time of the GSM8K-shaped exam: transformers, ours on whole prompts, ours sharing the
  prefix."""
  sampled = SamplingConfig(1.0, args.top_k, 1.0)
  k = args.exam_samples
  vocab_size = decoder.model.cfg.vocab_size
  prefix = rng.integers(3, vocab_size, args.exam_prefix)
  questions = [
      np.concatenate([prefix, rng.integers(3, vocab_size, args.exam_question + d)])
      for d in rng.integers(-10, 11, args.exam_questions)
  ]
  total = args.exam_questions * k * args.exam_new
  whole = ours_generate(decoder, params, questions, args.exam_new, k, sampled)
  shared = ours_generate(decoder, params, questions, args.exam_new, k, sampled, args.exam_prefix)
  exam = {
      "transformers": timed_row(
          hf_generate(twin, questions, args.exam_new, k, sampled, args.torch_device),
          args.repeats,
          total,
      ),
      "ours_whole_prompts": timed_row(whole, args.repeats, total),
      "ours_shared_prefix": timed_row(shared, args.repeats, total),
  }
  exam["same_tokens_with_and_without_prefix_reuse"] = bool((whole() == shared()).all())
  exam["ours_shared_prefix_over_transformers"] = (
      exam["transformers"]["seconds"] / exam["ours_shared_prefix"]["seconds"]
  )
  exam["prefix_reuse_speedup"] = (
      exam["ours_whole_prompts"]["seconds"] / exam["ours_shared_prefix"]["seconds"]
  )
  return exam


if __name__ == "__main__":
  main()
