"""The benchmarks run and report; their correctness checks (our greedy tokens equal transformers',
prefix reuse changes no token) hold. No timing is asserted."""
import json

from tailored_jax.bench import decode, train_step, versus_torch


def test_decode_benchmark_reports_and_agrees(capsys):
  decode.main([
      "--model=tiny", "--greedy_batch=4", "--greedy_prompt=8", "--greedy_new=6",
      "--exam_questions=2", "--exam_prefix=20", "--exam_question=12", "--exam_new=6", "--repeats=1"
  ])
  result = json.loads(capsys.readouterr().out)
  greedy, exam = result["greedy"], result["exam"]
  assert greedy["same_tokens_rows"] == greedy["rows"] == 4  # our greedy tokens are transformers'
  assert greedy["ours"]["new_tokens_per_s"] > 0 and greedy["transformers"]["new_tokens_per_s"] > 0
  assert exam["same_tokens_with_and_without_prefix_reuse"] is True
  assert exam["prefix_reuse_speedup"] == (exam["ours_whole_prompts"]["seconds"]
                                          / exam["ours_shared_prefix"]["seconds"])


def test_train_step_benchmark_reports(capsys):
  train_step.main(
      ["--seq_len=16", "--prefix_len=8", "--continuation_len=8", "--repeats=1", "--sr_rows=8"])
  result = json.loads(capsys.readouterr().out)
  assert result["parameters"] == 667520 and result["batch"] == 32
  assert result["lm"]["steps_per_s"] > 0 and result["self_reflection_cost_ratio"] > 0
  assert result["nonfinite_guard_cost_ratio"] > 0


def test_versus_torch_reports_both_sides(capsys):
  versus_torch.main(["--model=tiny", "--shapes=2x16", "--repeats=1"])
  result = json.loads(capsys.readouterr().out)
  row = result["shapes"]["2x16"]
  assert row["ours"]["tokens_per_s"] > 0 and row["torch"]["tokens_per_s"] > 0
  assert row["ours_over_torch_tokens_per_s"] == (row["ours"]["tokens_per_s"]
                                                 / row["torch"]["tokens_per_s"])
