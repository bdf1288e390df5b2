"""The benchmarks run and report; their correctness checks (our greedy tokens equal transformers',
prefix reuse changes no token) hold. No timing is asserted."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from tailored_jax.bench import attention, common, decode, decode_student, gpu_check, train_step
from tailored_jax.bench import machine as bench_machine
from tailored_jax.models import layers
from tailored_jax.models.attention import blockwise
from tailored_jax.models.llama import Llama
from tailored_jax.sample.sampling import SamplingConfig
from tailored_jax.train import step as step_lib


def test_decode_benchmark_reports_and_agrees(capsys):
  decode.main(
      [
          "--model=tiny",
          "--greedy_batch=4",
          "--greedy_prompt=8",
          "--greedy_new=6",
          "--exam_questions=2",
          "--exam_prefix=20",
          "--exam_question=12",
          "--exam_new=6",
          "--repeats=1",
      ]
  )
  result = json.loads(capsys.readouterr().out)
  greedy, exam = result["greedy"], result["exam"]
  assert greedy["same_tokens_rows"] == greedy["rows"] == 4  # our greedy tokens are transformers'
  assert greedy["ours"]["new_tokens_per_s"] > 0 and greedy["transformers"]["new_tokens_per_s"] > 0
  assert exam["same_tokens_with_and_without_prefix_reuse"] is True
  assert exam["prefix_reuse_speedup"] == (
      exam["ours_whole_prompts"]["seconds"] / exam["ours_shared_prefix"]["seconds"]
  )


def test_train_step_benchmark_reports_both_sides(capsys):
  train_step.main(["--model=tiny", "--shapes=2x16:6", "--repeats=1"])
  result = json.loads(capsys.readouterr().out)
  machine = result["machine"]  # every figure names its machine
  assert machine["cpu"]["cores"] == os.cpu_count() and machine["cpu"]["model"]
  assert set(machine["cpu"]["isa"]) <= set(bench_machine.X86_FLAGS + bench_machine.ARM_FEATURES)
  assert machine["versions"]["jax"] == jax.__version__
  assert machine["versions"]["torch"] == torch.__version__
  assert machine["torch"]["blas"] and machine["devices"] == {
      "platform": "cpu",
      "kind": "cpu",
      "count": jax.device_count(),
  }
  assert result["parameters"] == 90_432  # tied 256 × 64 embedding, 2 layers of 36,992, final norm
  row = result["shapes"]["2x16:6"]
  for key in (
      "ours_lm",
      "ours_self_reflection",
      "ours_self_reflection_reusing_lm",
      "torch_lm",
      "torch_self_reflection",
  ):
    assert row[key]["tokens_per_s"] == 2 * 16 / row[key]["seconds_per_step"]
  assert row["ours_over_torch_lm_tokens_per_s"] == (
      row["ours_lm"]["tokens_per_s"] / row["torch_lm"]["tokens_per_s"]
  )
  assert row["torch_self_reflection_over_lm"] == (
      row["torch_self_reflection"]["seconds_per_step"] / row["torch_lm"]["seconds_per_step"]
  )


def test_train_step_benchmark_reports_the_lm_throughput_change_with_length(capsys):
  train_step.main(["--model=tiny", "--shapes=2x16,2x32,4x16", "--repeats=1", "--lm_only"])
  result = json.loads(capsys.readouterr().out)
  rate = lambda shape, side: result["shapes"][shape][f"{side}_lm"]["tokens_per_s"]
  assert list(result["lm_tokens_per_s_change"]) == ["2x32:16 from 2x16:8"]
  change = result["lm_tokens_per_s_change"]["2x32:16 from 2x16:8"]
  for side in ("ours", "torch"):
    assert change[side] == rate("2x32:16", side) / rate("2x16:8", side) - 1


def test_attention_benchmark_agrees_with_torch_sdpa(capsys, monkeypatch):
  """Ours (the native kernel, and the XLA form mapped one row per tile here) and torch's fused
  causal attention, grouped-query: same outputs and query gradients on the same inputs."""
  monkeypatch.setattr(blockwise, "ATTENTION_TILE_BYTES", 1)
  attention.main(["--shapes=3x40", "--heads=4,2", "--head_dim=16", "--repeats=1"])
  row = json.loads(capsys.readouterr().out)["shapes"]["3x40"]
  for side in ("ours", "ours_xla"):
    assert row[f"{side}_max_abs_output_difference"] < 1e-5
    assert row[f"{side}_max_abs_query_gradient_difference"] < 1e-4
    assert row[f"torch_over_{side}_forward"] == (
        row["torch"]["forward_ms"] / row[side]["forward_ms"]
    )


@pytest.mark.parametrize("flag, value", [("shapes", "8xabc"), ("heads", "8"), ("heads", "8,3")])
def test_attention_benchmark_names_a_bad_flag(flag, value, capsys):
  with pytest.raises(SystemExit) as exit_info:
    attention.main([f"--{flag}={value}"])
  assert exit_info.value.code == 2
  assert f"--{flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("shapes", ["8xabc", "8x64:64", "8x64,4"])
def test_train_step_benchmark_names_a_bad_shape_before_building_anything(shapes, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_step.main(["--model=tiny", f"--shapes={shapes}"])
  assert exit_info.value.code == 2
  assert "--shapes:" in capsys.readouterr().err


def test_torch_reference_triplet_loss_is_ours():
  """The benchmark's torch side computes METHOD §3's triplet loss on the same work: same weights,
  same value."""
  cfg = common.PRESETS["tiny"]
  params = nn.meta.unbox(layers.init_boxed_params(Llama(cfg), jax.random.PRNGKey(0)))
  work = train_step.Work.random(train_step.Shape.parse("3x20:12"), cfg.vocab_size)
  _, reflection = work.ours()
  ours = jax.jit(
      lambda p: step_lib.self_reflection_loss(Llama(cfg), p, reflection, train_step.SR_MARGIN)
  )(params)
  twin = common.torch_twin(cfg, params, "cpu")
  with torch.no_grad():
    theirs = train_step.torch_triplet_loss(
        twin,
        torch.tensor(reflection.prefix, dtype=torch.long),
        torch.tensor(work.continuations(), dtype=torch.long),
    )
  assert float(ours) > 0.1
  np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-5)


def test_checkpoint_benchmark_times_both_saves(capsys):
  """The background (`StepCheckpoints`) and synchronous saves of the same state, one process."""
  from tailored_jax.bench import checkpoint

  checkpoint.main(["--model=tiny", "--shape=2x16", "--steps_after=1", "--saves=2"])
  result = json.loads(capsys.readouterr().out)
  for side in ("background", "synchronous"):
    assert result[side]["save_blocks_loop_s"] > 0
    assert result[side]["save_plus_steps_s"] >= result[side]["save_blocks_loop_s"]
  assert result["loop_seconds_saved_per_checkpoint"] == (
      result["synchronous"]["save_plus_steps_s"] - result["background"]["save_plus_steps_s"]
  )
  assert result["state_mb"] > 0 and result["step_s_without_save"] > 0


def test_decode_benchmark_on_a_student_directory_and_the_task_prompts(tmp_path, capsys):
  """`bench.decode --model=DIR`: a random tiny LLaMA saved by transformers, with a BPE tokenizer,
  decodes the GSM8K evaluation prompts (the few-shot prefix shared) with the same greedy tokens
  as transformers', both running every row to the budget."""
  import transformers

  from tailored_jax.data.tokenizer import train_bpe
  from tests.shared_data import DATA

  data = os.path.join(DATA, "gsm8k")
  if not os.path.isdir(data):
    pytest.skip(f"benchmark files not found at {DATA}")
  corpus = decode_student.task_prompts("gsm8k", data, 4)
  tok = train_bpe(corpus, 300)
  source = tmp_path / "llama"
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(
      transformers.LlamaConfig(
          vocab_size=tok.vocab_size,
          hidden_size=32,
          intermediate_size=64,
          num_hidden_layers=2,
          num_attention_heads=4,
          num_key_value_heads=2,
          max_position_embeddings=4096,
      )
  ).save_pretrained(source)
  tok.backend.save(str(source / "tokenizer.json"))
  (source / "tokenizer_config.json").write_text(
      json.dumps(
          {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
      )
  )
  decode.main(
      [
          f"--model={source}",
          f"--data_path={data}",
          "--prompts=3",
          "--new_tokens=5",
          "--sampled_prompts=1",
          "--samples=2",
          "--eval_prompts=3",
          "--eval_batch=2",
          "--repeats=1",
      ]
  )
  result = json.loads(capsys.readouterr().out)
  evaluation = result["evaluation"]
  assert evaluation["same_texts_continuous_static"] == 3
  assert evaluation["ours_continuous"]["new_tokens"] == evaluation["ours_static"]["new_tokens"] > 0
  assert evaluation["transformers"]["new_tokens"] > 0
  assert evaluation["ours_continuous_bfloat16_cache"]["new_tokens"] > 0
  assert 0 <= evaluation["same_texts_bfloat16_cache"] <= 3
  # equal texts give equal answers
  assert evaluation["same_texts_bfloat16_cache"] <= evaluation["same_answers_bfloat16_cache"] <= 3
  assert evaluation["accuracy_compute_dtype_cache"] == 0.0  # a random student
  greedy = result["greedy"]
  assert greedy["shared_prefix_tokens"] > 100  # the demos, prefilled once
  assert greedy["same_tokens_rows_shared_prefix"] == greedy["same_tokens_rows_whole_prompts"] == 3
  assert greedy["first_differences_shared_prefix"] == []
  assert result["sampled"]["ours_shared_prefix"]["new_tokens_per_s"] > 0
  # a row that differs is reported where it first does, with transformers' margin for its token
  theirs = transformers.LlamaForCausalLM.from_pretrained(source).eval()
  rows = [[5, 9, 17, 3], [7, 7, 2, 11]]
  expected = decode.hf_generate(theirs, rows, 4, 1, SamplingConfig(), "cpu", tok.pad_id)()
  ours = expected.copy()
  ours[1, 2] = (expected[1, 2] + 1) % tok.vocab_size
  (difference,) = decode_student.first_differences(theirs, rows, ours, expected)
  assert (difference["row"], difference["position"]) == (1, 2)
  assert (difference["transformers_token"], difference["ours_token"]) == (
      expected[1, 2],
      ours[1, 2],
  )
  assert 0 <= difference["transformers_logit_gap"] <= difference["transformers_logit_spread"]


def test_gpu_check_runs_both_sides_and_checks_the_kernel_values(tmp_path, capsys):
  """`bench.gpu_check --allow_cpu`: the bf16 attention `auto` takes on these devices (CPU: the
  blockwise form) against float32 XLA, beside XLA and torch in bf16; the LM step of both sides;
  the JSON printed and written."""
  out = tmp_path / "gpu_check.json"
  result = gpu_check.main(
      [
          "--allow_cpu",
          "--presets=tiny:2x24",
          "--attention_shape=2x48",
          "--repeats=1",
          f"--out={out}",
      ]
  )
  assert json.loads(capsys.readouterr().out) == json.loads(out.read_text()) == result
  (row,) = result["attention"].values()
  assert row["auto_is"] == "cpu_blockwise" and "bfloat16" in row["why"]
  for arm in ("auto", "xla", "torch_sdpa"):
    assert 1e-4 < row[arm]["output_error"] < 2e-2  # bf16 rounding, no more
    assert 1e-4 < row[arm]["gradient_error"] < 5e-2
  assert row["auto_within_tolerance"] and result["passed"]
  assert row["xla_over_auto_forward"] == row["xla"]["forward_ms"] / row["auto"]["forward_ms"]
  step = result["train_step"]["tiny 2x24"]
  assert step["parameters"] == 90_432 and step["attention"] == "cpu_blockwise"
  for side in ("ours", "torch"):
    assert step[side]["tokens_per_s"] == 48 / step[side]["seconds_per_step"]
    assert step[side]["mfu"] is None  # no data sheet for a CPU
  assert result["bf16_peak_tflops"] is None and result["torch_device"] == "cpu"


@pytest.mark.parametrize("presets", ["nope:2x24", "tiny", "tiny:2xabc"])
def test_gpu_check_names_a_bad_preset_before_building_anything(presets, capsys):
  with pytest.raises(SystemExit) as exit_info:
    gpu_check.main(["--allow_cpu", f"--presets={presets}"])
  assert exit_info.value.code == 2
  assert f"--presets: {presets!r}" in capsys.readouterr().err


def test_gpu_check_asks_for_a_gpu(capsys):
  with pytest.raises(SystemExit) as exit_info:
    gpu_check.main(["--presets=tiny:2x24"])
  assert exit_info.value.code == 2
  assert "no GPU: JAX's first device is cpu" in capsys.readouterr().err


def test_gpu_check_tolerance_is_bf16_rounding_not_a_wrong_kernel():
  xla = {"output_error": 4e-3, "gradient_error": 6e-3}
  assert gpu_check.within_tolerance({"output_error": 7e-3, "gradient_error": 1e-2}, xla)
  assert not gpu_check.within_tolerance({"output_error": 0.3, "gradient_error": 1e-2}, xla)
  assert gpu_check.relative_error(np.array([1.0, -2.5]), np.array([1.0, -2.0])) == 0.25


def test_torch_twin_of_a_llama3_rope_preset_gives_our_logits():
  """The torch side of the GPU check's Llama-3.2-1B preset scales its rope as ours does."""
  cfg = dataclasses.replace(
      common.PRESETS["tiny"],
      rope_theta=500000.0,
      rope_scaling="llama3",
      rope_factor=8.0,
      rope_original_max_positions=16,
  )
  params = nn.meta.unbox(layers.init_boxed_params(Llama(cfg), jax.random.PRNGKey(0)))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
  positions = np.broadcast_to(np.arange(40), tokens.shape)
  logits, _, _ = Llama(cfg).apply(
      {"params": params}, tokens, positions, np.ones(tokens.shape, bool)
  )
  with torch.no_grad():
    theirs = common.torch_twin(cfg, params, "cpu")(torch.tensor(tokens, dtype=torch.long))
  np.testing.assert_allclose(theirs.logits.numpy(), np.asarray(logits), atol=2e-4)
  assert common.PRESETS["llama32_1b"].rope_scaling == "llama3"
