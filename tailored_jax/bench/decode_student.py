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
- evaluation: `eval_prompts` prompts decoded as a run's evaluation decodes them (the task's
  budget; rows stop at EOS or a blank line), `eval_batch` rows at a time: ours in static batches
  (each runs until its longest row stops) and with continuous batching (`generate_texts`), and
  transformers' `generate` in the same static batches, stopping at EOS or "\n\n"
  (`stop_strings`); generated tokens, seconds and how many texts are identical; with
  `kv_cache_dtype`, continuous batching again with the KV cache in that dtype, and the test
  accuracy of both caches' answers.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np

import ml_collections

from tailored_jax import config_lib, sharding
from tailored_jax.bench.common import median_seconds, report
from tailored_jax.bench.decode import hf_generate, ours_generate, timed_row
from tailored_jax.data import scoring
from tailored_jax.data.batching import round_up
from tailored_jax.data.tasks import build_task
from tailored_jax.models import for_devices
from tailored_jax.sample.decode import Decoder, StopTables
from tailored_jax.sample.runner import generate_texts, left_pad, shared_prefix_length
from tailored_jax.sample.sampling import SamplingConfig
from tailored_jax.student_io.student import load_student


def _task(task_name: str, data_path: str, count: int):
  task_cfg = config_lib.paper_config(task_name, "llama").task
  task_cfg.data_path = data_path
  task_cfg.max_test = count
  return build_task(task_cfg)


def task_prompts(task_name: str, data_path: str, count: int) -> list[str]:
  """The evaluation's prompts for the first `count` test questions (all the task's demos)."""
  task = _task(task_name, data_path, count)
  demos = task.demos()
  return [task.format_prefix(x.question, demos) for x in task.splits()["test"][:count]]


def transformers_tokenizer(path: str):
  import transformers

  if path.endswith(".gguf"):
    directory, name = os.path.split(path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  return transformers.AutoTokenizer.from_pretrained(path)


def timed_greedy(args, decoder, student, prompts, budget, mesh, label, continuous):
  """Greedy texts of `prompts` as the evaluation decodes them, and the call's timing."""
  stats, out = {}, {}

  def ours():
    out["texts"] = generate_texts(
        decoder,
        student.params,
        student.tokenizer,
        prompts,
        mesh=mesh,
        num_samples=1,
        sampling=SamplingConfig(),
        max_new_tokens=budget,
        batch_size=args.eval_batch,
        rng=jax.random.PRNGKey(0),
        label=label,
        continuous=continuous,
        stats=stats,
    )

  first, seconds = median_seconds(ours, args.repeats)
  return out["texts"], {
      "first_call_s": first,
      "seconds": seconds,
      "new_tokens": stats["tokens"],
      "new_tokens_per_s": stats["tokens"] / seconds,
  }


def evaluation(args, student, theirs, prompts: list[str]) -> dict:
  """The `evaluation` part: ours static and continuous, and transformers, on the same prompts."""
  import torch

  tok, cfg = student.tokenizer, student.model.cfg
  budget = _task(args.task, args.data_path, 1).max_new_tokens
  decoder = Decoder(student.model, StopTables.from_tokenizer(tok, cfg.vocab_size))
  mesh = sharding.make_mesh(
      ml_collections.ConfigDict({"mesh": dict(data=-1, fsdp=1, tensor=1, num_devices=1)})
  )
  result = {"prompts": len(prompts), "batch": args.eval_batch, "max_new_tokens": budget}
  texts = {}
  for name, continuous in (("ours_static", False), ("ours_continuous", True)):
    texts[name], result[name] = timed_greedy(
        args, decoder, student, prompts, budget, mesh, name, continuous
    )
  encoded = tok.encode_batch(prompts)
  order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
  hf_tokenizer = transformers_tokenizer(args.model)
  rows: dict[int, list[int]] = {}

  def hf():
    for at in range(0, len(order), args.eval_batch):
      chunk = order[at : at + args.eval_batch]
      length = round_up(max(len(encoded[i]) for i in chunk), 32)
      ids, valid = left_pad([encoded[i] for i in chunk], length, len(chunk), tok.pad_id)
      with torch.no_grad():
        out = theirs.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(valid, dtype=torch.long),
            max_new_tokens=budget,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
            stop_strings=["\n\n"],
            tokenizer=hf_tokenizer,
        )
      for i, row in zip(chunk, out[:, length:].tolist()):
        ends = [n + 1 for n, t in enumerate(row) if t in (tok.eos_id, tok.pad_id)]
        rows[i] = row[: ends[0]] if ends else row
        if rows[i] and rows[i][-1] == tok.pad_id:
          rows[i] = rows[i][:-1]

  first, seconds = median_seconds(hf, args.repeats)
  generated = sum(len(r) for r in rows.values())
  result["transformers"] = {
      "first_call_s": first,
      "seconds": seconds,
      "new_tokens": generated,
      "new_tokens_per_s": generated / seconds,
  }
  theirs_texts = tok.decode_batch([rows[i] for i in range(len(prompts))])
  static = [t[0] for t in texts["ours_static"]]
  result["same_texts_continuous_static"] = sum(
      a[0] == b for a, b in zip(texts["ours_continuous"], static)
  )
  result["same_texts_static_transformers"] = sum(a == b for a, b in zip(static, theirs_texts))
  result["continuous_over_static"] = (
      result["ours_static"]["seconds"] / result["ours_continuous"]["seconds"]
  )
  result["continuous_over_transformers"] = (
      result["transformers"]["seconds"] / result["ours_continuous"]["seconds"]
  )
  if args.kv_cache_dtype:
    result.update(cache_dtype_arm(args, student, prompts, texts["ours_continuous"], budget, mesh))
  return result


def cache_dtype_arm(args, student, prompts, reference, budget, mesh) -> dict:
  """Continuous batching with the KV cache in `args.kv_cache_dtype`: its time, how many texts and
  extracted answers equal the compute dtype's (`reference`), and both caches' accuracy on these
  test questions."""
  tok, cfg = student.tokenizer, student.model.cfg
  model = type(student.model)(dataclasses.replace(cfg, kv_cache_dtype=args.kv_cache_dtype))
  decoder = Decoder(model, StopTables.from_tokenizer(tok, cfg.vocab_size))
  name = f"ours_continuous_{args.kv_cache_dtype}_cache"
  texts, timing = timed_greedy(args, decoder, student, prompts, budget, mesh, name, True)
  task = _task(args.task, args.data_path, len(prompts))
  examples = task.splits()["test"][: len(prompts)]
  scored = lambda texts: scoring.score(task, examples, [t[0] for t in texts])
  (ref_records, ref_summary), (records, summary) = scored(reference), scored(texts)
  dtype = args.kv_cache_dtype
  return {
      name: timing,
      f"same_texts_{dtype}_cache": sum(a == b for a, b in zip(texts, reference)),
      f"same_answers_{dtype}_cache": sum(
          a["answer"] == b["answer"] for a, b in zip(records, ref_records)
      ),
      "accuracy_compute_dtype_cache": ref_summary["accuracy"],
      f"accuracy_{dtype}_cache": summary["accuracy"],
  }


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


def first_differences(theirs, rows, ours_rc: np.ndarray, expected_rc: np.ndarray) -> list[dict]:
  """Rows whose greedy tokens differ from transformers': the first differing position, both
  tokens, and transformers' logit of its token minus ours there (one forward over the prompt and
  the shared tokens): a gap near zero is a near tie that float order decides, not a wrong step."""
  import torch

  out = []
  for r in np.flatnonzero((ours_rc != expected_rc).any(axis=1)):
    at = int(np.argmax(ours_rc[r] != expected_rc[r]))
    theirs_token, our_token = int(expected_rc[r, at]), int(ours_rc[r, at])
    ids = torch.tensor([list(rows[r]) + expected_rc[r, :at].tolist()], dtype=torch.long)
    with torch.no_grad():
      logits_v = theirs(input_ids=ids).logits[0, -1]
    out.append(
        {
            "row": int(r),
            "position": at,
            "transformers_token": theirs_token,
            "ours_token": our_token,
            "transformers_logit_gap": float(logits_v[theirs_token] - logits_v[our_token]),
            "transformers_logit_spread": float(logits_v.max() - logits_v.min()),
        }
    )
  return out


def run(args) -> None:
  import torch

  student = load_student(args.model)
  # the model as a run's decoding compiles it for this device (on CPU: the native decode kernel)
  student = dataclasses.replace(student, model=for_devices(student.model, jax.devices()[:1]))
  tok = student.tokenizer
  cfg = student.model.cfg
  decoder = Decoder(student.model, no_eos_tables(cfg.vocab_size, tok.pad_id, tok.eos_id))
  theirs = transformers_model(args.model)
  parts = args.parts.split(",")
  prompts = task_prompts(
      args.task, args.data_path, max(args.prompts, args.sampled_prompts, args.eval_prompts)
  )
  encoded = tok.encode_batch(prompts)
  results = {}
  if "greedy" in parts:
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
        "first_differences_shared_prefix": first_differences(theirs, rows, shared_call(), expected),
    }
    g = results["greedy"]
    g["ours_over_transformers"] = g["transformers"]["seconds"] / g["ours_shared_prefix"]["seconds"]
  if "sampled" in parts:
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
  if "evaluation" in parts:
    results["evaluation"] = evaluation(args, student, theirs, prompts[: args.eval_prompts])
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
