"""`tailored_jax.plan`: the real train and decode steps lowered and compiled on abstract
arguments over 8 (in-process) and 32 (forced host devices, the command line) devices."""

import json
import os
import subprocess
import sys

import pytest

from tailored_jax import config_lib, plan
from tests.processes import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(cfg):
  cfg.train.update(batch_size=8, max_seq_len=64, max_continuation_len=16)
  cfg.exam.update(batch_size=8, max_new_tokens=16)
  return cfg


def test_lowering_on_8_devices_reports_xlas_bytes_and_collectives():
  cfg = small(config_lib.from_file(os.path.join(ROOT, "configs", "quickstart.py")))
  cfg.mesh.update(data=2, fsdp=2, tensor=2, num_devices=8)
  report = plan.lower(cfg, "tiny")
  train, exam = report["train_step"], report["exam_decode"]
  # XLA's argument bytes per device are exactly the sharded state and batch
  assert train["xla_bytes_per_device"]["argument"] == train["inputs_from_shardings"]
  # tiny: vocab 512, d 64, 2 layers, 8 heads / 4 kv of 8, d_ff 128, tied; every matrix split 4
  # ways (embed over fsdp and heads/mlp/vocab over tensor), the norms whole
  matrices = 512 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
  assert train["parameters_per_device"] == 4 * (matrices // 4 + 5 * 64)
  assert train["optimizer_per_device"] >= 2 * train["parameters_per_device"]  # AdamW mu and nu
  assert train["xla_bytes_per_device"]["temp"] > 0
  assert train["collectives"]["all-reduce"]["count"] > 0
  # decoding: heads/mlp/vocab over tensor x fsdp, embed whole: the same bytes, laid out apart
  assert exam["layout"] == "model_parallel"
  assert exam["parameters_per_device"] == train["parameters_per_device"]
  assert exam["xla_bytes_per_device"]["argument"] > exam["parameters_per_device"]


def test_the_command_forces_32_host_devices():
  env = child_env()
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "tailored_jax.plan",
          "--config=configs/quickstart.py",
          "--model=tiny",
          "--devices=32",
          "--mesh=2,4,4",
          "--config.train.batch_size=8",
          "--config.train.max_seq_len=64",
          "--config.train.max_continuation_len=16",
          "--config.exam.batch_size=8",
          "--config.exam.max_new_tokens=16",
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      check=True,
  )
  report = json.loads(out.stdout)
  assert report["devices"] == 32 and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 4}
  train = report["train_step"]
  assert train["xla_bytes_per_device"]["argument"] == train["inputs_from_shardings"]


def test_a_batch_the_mesh_cannot_split_is_one_line():
  env = child_env()
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "tailored_jax.plan",
          "--config=configs/quickstart.py",
          "--model=tiny",
          "--devices=8",
          "--mesh=1,8,1",
          "--config.train.batch_size=4",
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
  )
  assert out.returncode != 0
  assert (
      out.stderr.strip()
      .splitlines()[-1]
      .startswith("error: configs/quickstart.py on mesh 1,8,1 over 8 devices: ")
  )


def test_collectives_count_a_while_body_by_its_trip_count():
  hlo = """
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}, to_apply=%add
}
%cond (p: (s32[], f32[8])) -> pred[] {
  %c = pred[] constant(true)
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %ag = f32[16]{0} all-gather(f32[8]{0} %a), dimensions={0}
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={TRIPS}
}
"""
  hlo = hlo.replace("{TRIPS}", '{"known_trip_count":{"n":"30"}}')
  assert plan.collectives(hlo) == {
      "all-gather": {"count": 1, "bytes": 64},
      "all-reduce": {"count": 30, "bytes": 30 * 32},
  }


def test_the_planner_agrees_with_xla_and_names_the_batch_that_fits():
  """A scanned student with each block recomputed: the planner's temporaries (gradients,
  kept block inputs, one layer's recompute, logits) against XLA's compiled temp bytes."""
  cfg = config_lib.from_file(os.path.join(ROOT, "configs", "quickstart.py"))
  cfg.model.update(remat="full", scan_layers=True)
  cfg.train.update(
      batch_size=16,
      max_seq_len=256,
      max_continuation_len=64,
      sr_batch_size=16,
      loss_chunk_tokens=64,
  )
  cfg.exam.update(batch_size=8, max_new_tokens=16)
  cfg.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
  report = plan.lower(cfg, "planner_check", device_memory_gb=0.5)
  train = report["train_step"]
  assert 0.7 <= train["planned_temp_over_xla_temp"] <= 1.3, train
  planned = train["planned_gb"]
  assert planned["gradients"] == planned["parameters"] > 0
  assert train["fits"] == (planned["total"] <= 0.5)
  batch = train["largest_batch_that_fits"]
  smaller = plan.lower(
      cfg, "planner_check", device_memory_gb=planned["total"] / 2, compile_steps=False
  )["train_step"]
  assert not smaller["fits"] and 0 < smaller["largest_batch_that_fits"] < 16 <= batch


def test_a_round_refuses_a_step_that_cannot_fit_before_allocating(tmp_path):
  from tailored_jax import rounds
  from tests.test_rounds import tiny_config

  cfg = tiny_config()
  cfg.train.memory_budget_gb = 0.0001
  with pytest.raises(config_lib.ConfigError) as error:
    rounds.run(cfg, str(tmp_path / "run"))
  message = str(error.value)
  assert message.startswith("the train step needs ") and "GB per device (parameters " in message
  assert "budget is 0.00 GB (train.memory_budget_gb" in message
  assert "not even one row per device fits" in message or "largest train.batch_size" in message
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_gptj_6b_on_an_h100_slice_fits_by_the_planner():
  """The paper's student at the paper's batch (16 x 656) on 1x8 H100 (fsdp 8, full remat)."""
  env = child_env()
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "tailored_jax.plan",
          "--config=configs/gsm8k_gptj6b.py",
          "--model=gptj_6b",
          "--slice=h100-1x8",
          "--no_compile",
          "--config.train.max_seq_len=656",
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      check=True,
  )
  report = json.loads(out.stdout)
  assert report["slice"] == "h100-1x8" and report["devices"] == 8
  assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  train = report["train_step"]
  assert train["device_memory_gb"] == 80 and train["fits"] and train["batch"] == 16
  # float32 weights split 8 ways (norms and biases whole)
  assert 6050882784 * 4 / 8 / 1e9 <= train["planned_gb"]["parameters"] < 3.03
  assert train["largest_batch_that_fits"] >= 16


def test_a_mesh_preset_must_match_the_devices():
  from tailored_jax import sharding

  cfg = config_lib.base_config()
  cfg.mesh.preset = "tpu-v4-32"
  assert sharding.mesh_shape(cfg, 16) == (1, 16, 1)
  with pytest.raises(ValueError, match="'tpu-v4-32' is a slice of 16 devices, this run has 8"):
    sharding.mesh_shape(cfg, 8)
  cfg.mesh.preset = "tpu-v9"
  with pytest.raises(config_lib.ConfigError, match="config field mesh.preset: must be one of"):
    config_lib.validate(cfg)


def test_the_pods_table_row_reads_a_plan_and_a_refusal():
  from tailored_jax import pods

  step = {
      "device_memory_gb": 17.18,
      "fits": True,
      "microbatches": 2,
      "largest_batch_that_fits": 48,
      "xla_bytes_per_device": {"total": 10.59e9},
      "collectives": {"all-gather": {"count": 42, "bytes": 5.66e9}},
      "roofline": {"estimated_step_seconds": 0.4412},
  }
  assert pods.row("gptj_6b", "v5e-16", {"train_step": step}) == (
      "| gptj_6b | v5e-16 | yes | 10.59 / 17.2 | 2 | 48 | 42 AG 5.7 GB, 0 AR 0.0 GB | 0.44 |"
  )
  refused = {
      "device_memory_gb": 17.18,
      "compiler_error": "RESOURCE_EXHAUSTED: Ran out of memory on HBM",
      "microbatches_tried": [1, 2],
      "largest_batch_that_fits": 8,
  }
  assert pods.row("gptj_6b", "v5e-8", {"train_step": refused}).startswith(
      "| gptj_6b | v5e-8 | no | > 17.2 (compiler: out of HBM) | tried 1,2 | 8 (planner) |"
  )
  assert pods.row("x", "y", {"error": "libtpu missing"}).startswith("| x | y | error: libtpu")
