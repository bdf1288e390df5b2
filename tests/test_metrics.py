"""TensorBoard event files written by a run, read back; W&B in offline mode; nothing from a
process that does not write; progress that counts steps the device has finished."""

import glob
import json
import os
import struct

import jax
import jax.numpy as jnp
import pytest
from tensorboardX.proto import event_pb2

from tailored_jax import config_lib, metrics as metrics_lib
from tailored_jax import workdir as wd
from tailored_jax.progress import Progress
from tailored_jax.train import hooks
from tests.test_rounds import read


def read_events(logdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from every event file in `logdir` (TFRecord framing: length, its
  CRC, the Event proto, its CRC)."""
  scalars: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at : at + 8])
      event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def read_wandb_history(path: str) -> dict[int, dict]:
  """{step: {key: value}} of the history records in a W&B run file: a 7-byte header, then
  LevelDB-log records (CRC, 2-byte length, type; 32 KiB blocks) holding `Record` protos."""
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  at, pieces, history = 7, b"", {}
  while at + 7 <= len(data):
    if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
      at += 32768 - at % 32768
      continue
    length, kind = struct.unpack("<HB", data[at + 4 : at + 7])
    pieces += data[at + 7 : at + 7 + length]
    at += 7 + length
    if kind in (1, 4):  # FULL or LAST: one whole record
      record = wandb_internal_pb2.Record.FromString(pieces)
      pieces = b""
      if record.WhichOneof("record_type") == "history":
        items = {
            "/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item
        }
        history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
  return history


def test_a_run_writes_its_train_and_round_scalars(reference):
  workdir, records = reference
  events = read_events(os.path.join(workdir, "tensorboard"))
  steps = [json.loads(read(workdir, f"round_{r}", "train.json"))["steps"] for r in (1, 2)]
  train_2 = json.loads(read(workdir, "round_2", "train.json"))
  # steps number on across rounds: round 2's last step is the run's step 6 + 6
  last = max(events["train/loss"])
  assert last == sum(steps)
  assert events["train/loss"][last] == pytest.approx(train_2["final_loss"], rel=1e-6)
  assert events["train/lm_loss"][last] == pytest.approx(train_2["final_lm_loss"], rel=1e-6)
  for tag in ("train/target_tokens_per_s", "train/model_tflops_per_device", "train/mfu"):
    assert events[tag][last] > 0
  for record in records:
    r = record["round"]
    assert events["round/val_accuracy"][r] == pytest.approx(record["val_accuracy"])
    assert events["round/test_accuracy"][r] == pytest.approx(record["test_accuracy"])
    assert events["round/teacher_requests"][r] == record["teacher_requests"]
    assert events["round/teacher_tokens"][r] == record["teacher_tokens"]
    assert events["round/mistakes"][r] == record["mistakes"]
  fixed = {r["round"]: r["mistakes_fixed"] for r in records if r["mistakes_fixed"] is not None}
  assert events.get("round/mistakes_fixed", {}) == fixed  # none without exams on both sides
  assert set(events["phase_seconds/train"]) == {1, 2} and 0 in events["phase_seconds/annotate"]


def test_weights_and_biases_offline_gets_the_same_scalars(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = config_lib.base_config().logging
  cfg.update(wandb_project="tailored-jax-test", wandb_mode="offline")
  writer = metrics_lib.Metrics.for_run(
      cfg, str(tmp_path / "run" / "tensorboard"), "run", {"seed": 1}
  )
  writer.scalars({"train/loss": 2.5, "train/mfu": None}, 3)
  writer.round_record(
      {"round": 1, "val_accuracy": 0.25, "test_accuracy": 0.5, "seconds": 1.0},
      teacher_cost_usd=0.125,
  )
  writer.close()
  runs = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "*.wandb"))
  assert len(runs) == 1, os.listdir(tmp_path / "run")
  history = list(read_wandb_history(runs[0]).values())  # each group on its own x-axis
  assert history[0] == {"train/loss": 2.5, "train/step": 3}  # None (no MFU peak) left out
  assert history[1] == {
      "round/val_accuracy": 0.25,
      "round/test_accuracy": 0.5,
      "round/seconds": 1.0,
      "round/teacher_cost_usd": 0.125,
      "round/step": 1,
  }
  assert read_events(str(tmp_path / "run" / "tensorboard"))["round/test_accuracy"] == {1: 0.5}


def test_only_the_writing_process_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(wd, "is_writer", lambda: False)
  writer = metrics_lib.Metrics.for_run(
      config_lib.base_config().logging, str(tmp_path / "tb"), "run", {}
  )
  writer.scalars({"train/loss": 1.0}, 1)
  writer.close()
  assert not os.path.exists(tmp_path / "tb")


def test_progress_counts_the_steps_the_device_finished_not_those_dispatched():
  """A deliberately slow jitted step (40 chained 512 x 512 matmuls): dispatching three returns
  at once, and none of them is done yet, so the display still says 0."""

  @jax.jit
  def slow_step(x):
    return jax.lax.fori_loop(0, 40, lambda i, x: jnp.tanh(x @ x), x)

  x = jnp.ones((512, 512)) / 512
  slow_step(x).block_until_ready()  # compiled
  progress = Progress("train 1", 3, "steps", stream=open(os.devnull, "w"))
  completed = hooks.CompletedSteps(progress, max_in_flight=3)
  for _ in range(3):
    x = slow_step(x)
    completed.dispatched(x)
  assert progress.done == 0 and progress.line().startswith("train 1: 0/3 steps (0%)")
  completed.drain()
  assert progress.done == 3 and x.is_ready()
  # by default the host runs at most two steps ahead: the third dispatch waits for the first,
  # so a preemption signal checked between steps acts within two steps
  progress = Progress("train 1", 3, "steps", stream=open(os.devnull, "w"))
  completed, first = hooks.CompletedSteps(progress), None
  for _ in range(3):
    x = slow_step(x)
    first = first if first is not None else x
    completed.dispatched(x)
  assert first.is_ready() and progress.done >= 1 and len(completed._pending) <= 2
  completed.drain()
