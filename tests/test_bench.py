"""The benchmarks run and report; their correctness check (cached == recomputed greedy tokens)
holds. No timing is asserted."""
import json

from tailored_jax.bench import decode, train_step, versus_torch


def test_decode_benchmark_reports_and_agrees(capsys):
  decode.main(["--prompts=4", "--prompt_len=8", "--new_tokens=6", "--samples=2", "--repeats=1"])
  result = json.loads(capsys.readouterr().out)
  assert result["same_greedy_tokens"] is True
  assert result["kv_cache_sampled_k"]["sequences"] == 8
  assert result["kv_cache_speedup"] > 0


def test_train_step_benchmark_reports(capsys):
  train_step.main(["--seq_len=16", "--prefix_len=8", "--continuation_len=8", "--repeats=1"])
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
