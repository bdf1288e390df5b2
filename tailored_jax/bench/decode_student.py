"""`python -m tailored_jax.bench.decode --model=PATH --data_path=DIR`: a real student (a GGUF file
or an HF directory) decoding the evaluation's own prompts (the task's few-shot prompt over its
test questions), ours against transformers' `generate` on the same weights, side by side in one
process (float32). Both run every row to the full budget (EOS is banned in both, as
transformers' `min_new_tokens` does), so tokens/s counts the same tokens.

- greedy: `prompts` rows × `new_tokens`: ours as the evaluation runs it (the few-shot prefix
  prefilled once and shared), ours prefilling whole prompts, and transformers; how many rows
  have identical tokens.
- sampled: `sampled_prompts` prompts × k samples at T=1.0, top-k 50: wall time of ours (shared
  prefix, one prefill per prompt read by its k samples) and of `generate(num_return_sequences=k)`.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from tailored_jax import config_lib
from tailored_jax.bench.common import report
from tailored_jax.bench.decode import hf_generate, ours_generate, timed_row
from tailored_jax.data.tasks import build_task
from tailored_jax.sample.decode import Decoder, StopTables
from tailored_jax.sample.runner import shared_prefix_length
from tailored_jax.sample.sampling import SamplingConfig
from tailored_jax.student_io.student import load_student


def task_prompts(task_name: str, data_path: str, count: int) -> list[str]:
  """The evaluation's prompts for the first `count` test questions (all the task's demos)."""
  task_cfg = config_lib.paper_config(task_name, "llama").task
  task_cfg.data_path = data_path
  task_cfg.max_test = count
  task = build_task(task_cfg)
  demos = task.demos()
  return [task.format_prefix(x.question, demos) for x in task.splits()["test"][:count]]


def transformers_model(path: str):
  import torch
  import transformers

  if path.endswith(".gguf"):
    directory, name = os.path.split(path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    ).eval()
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def no_eos_tables(vocab_size: int, pad_id: int, eos_id: int) -> StopTables:
  """Every row runs the full budget: EOS never drawn (transformers' `min_new_tokens`)."""
  tables = StopTables.never_stop(vocab_size, pad_id)
  never = tables.never_v.copy()
  never[eos_id] = True
  return tables.replace(never_v=never)


def run(args) -> None:
  import torch

  student = load_student(args.model)
  tok = student.tokenizer
  cfg = student.model.cfg
  decoder = Decoder(student.model, no_eos_tables(cfg.vocab_size, tok.pad_id, tok.eos_id))
  theirs = transformers_model(args.model)
  prompts = task_prompts(args.task, args.data_path, max(args.prompts, args.sampled_prompts))
  encoded = tok.encode_batch(prompts)
  results = {}
  if "greedy" in args.parts.split(","):
    rows = encoded[: args.prompts]
    greedy, total = SamplingConfig(), args.prompts * args.new_tokens
    shared = shared_prefix_length(rows)
    ours = functools.partial(ours_generate, decoder, student.params, rows, args.new_tokens, 1)
    shared_call = ours(greedy, shared, tok.pad_id)
    whole_call = ours(greedy, 0, tok.pad_id)
    hf_call = hf_generate(theirs, rows, args.new_tokens, 1, greedy, "cpu", tok.pad_id)
    expected = hf_call()
    results["greedy"] = {
        "prompts": args.prompts,
        "prompt_tokens": [min(map(len, rows)), max(map(len, rows))],
        "shared_prefix_tokens": shared,
        "new_tokens": args.new_tokens,
        "ours_shared_prefix": timed_row(shared_call, args.repeats, total),
        "ours_whole_prompts": timed_row(whole_call, args.repeats, total),
        "transformers": timed_row(hf_call, args.repeats, total),
        "same_tokens_rows_shared_prefix": int((shared_call() == expected).all(axis=1).sum()),
        "same_tokens_rows_whole_prompts": int((whole_call() == expected).all(axis=1).sum()),
    }
    g = results["greedy"]
    g["ours_over_transformers"] = g["transformers"]["seconds"] / g["ours_shared_prefix"]["seconds"]
  if "sampled" in args.parts.split(","):
    rows, k = encoded[: args.sampled_prompts], args.samples
    sampled, total = SamplingConfig(1.0, 50, 1.0), args.sampled_prompts * k * args.new_tokens
    shared = shared_prefix_length(rows)
    ours = ours_generate(
        decoder, student.params, rows, args.new_tokens, k, sampled, shared, tok.pad_id
    )
    hf_call = hf_generate(theirs, rows, args.new_tokens, k, sampled, "cpu", tok.pad_id)
    results["sampled"] = {
        "prompts": args.sampled_prompts,
        "samples": k,
        "new_tokens": args.new_tokens,
        "ours_shared_prefix": timed_row(ours, args.repeats, total),
        "transformers": timed_row(hf_call, args.repeats, total),
    }
    s = results["sampled"]
    s["ours_over_transformers"] = s["transformers"]["seconds"] / s["ours_shared_prefix"]["seconds"]
  report(
      "decode_student",
      model=args.model,
      task=args.task,
      parameters=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(student.params)),
      dtype="float32",
      torch_threads=torch.get_num_threads(),
      torch_version=torch.__version__,
      repeats=args.repeats,
      **results,
      compilations=decoder.compilations,
  )
