"""`tailored_jax.plan`: the real train and decode steps lowered and compiled on abstract
arguments over 8 (in-process) and 32 (forced host devices, the command line) devices."""
import json
import os
import subprocess
import sys

from tailored_jax import config_lib, plan

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
  assert train["bytes_per_device"]["argument"] == train["inputs_from_shardings"]
  # tiny: vocab 512, d 64, 2 layers, 8 heads / 4 kv of 8, d_ff 128, tied; every matrix split 4
  # ways (embed over fsdp and heads/mlp/vocab over tensor), the norms whole
  matrices = 512 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
  assert train["parameters_per_device"] == 4 * (matrices // 4 + 5 * 64)
  assert train["optimizer_per_device"] >= 2 * train["parameters_per_device"]  # AdamW mu and nu
  assert train["bytes_per_device"]["temp"] > 0 and train["collectives"]["all-reduce"]["count"] > 0
  # decoding: heads/mlp/vocab over tensor x fsdp, embed whole: the same bytes, laid out apart
  assert exam["layout"] == "model_parallel"
  assert exam["parameters_per_device"] == train["parameters_per_device"]
  assert exam["bytes_per_device"]["argument"] > exam["parameters_per_device"]


def test_the_command_forces_32_host_devices():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([
      sys.executable, "-m", "tailored_jax.plan", "--config=configs/quickstart.py", "--model=tiny",
      "--devices=32", "--mesh=2,4,4", "--config.train.batch_size=8",
      "--config.train.max_seq_len=64", "--config.train.max_continuation_len=16",
      "--config.exam.batch_size=8", "--config.exam.max_new_tokens=16"
  ], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
  report = json.loads(out.stdout)
  assert report["devices"] == 32 and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 4}
  train = report["train_step"]
  assert train["bytes_per_device"]["argument"] == train["inputs_from_shardings"]


def test_a_batch_the_mesh_cannot_split_is_one_line():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([
      sys.executable, "-m", "tailored_jax.plan", "--config=configs/quickstart.py", "--model=tiny",
      "--devices=8", "--mesh=1,8,1", "--config.train.batch_size=4"
  ], capture_output=True, text=True, cwd=ROOT, env=env)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith(
      "error: configs/quickstart.py on mesh 1,8,1 over 8 devices: ")
