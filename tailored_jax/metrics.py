"""Scalars where people look: TensorBoard event files in the workdir (tensorboardX, no
TensorFlow) and, when `logging.wandb_project` is set, Weights & Biases. Process 0 writes; the
others hold a writer that does nothing."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2

from tailored_jax import storage
from tailored_jax import workdir as wd

ROUND_FIELDS = (
    "train_examples",
    "optimizer_steps",
    "mistakes",
    "teacher_requests",
    "teacher_tokens",
    "mistakes_fixed",
    "mistakes_persistent",
    "mistakes_new",
    "val_accuracy",
    "test_accuracy",
    "seconds",
)


class Metrics:
  """`scalars(values, step)`: each value under its tag (`train/loss`, `round/val_accuracy`).
  Built without writers (`Metrics()`) it writes nothing: tools and tests that train outside a
  run, and every process but 0."""

  def __init__(self, tensorboard=None, wandb_run=None):
    self._tensorboard, self._wandb = tensorboard, wandb_run
    self._wandb_groups: set[str] = set()

  @classmethod
  def for_run(cls, log_cfg, logdir: str, run_name: str, config: dict) -> "Metrics":
    """The writers `log_cfg` (config.logging) asks for, on process 0."""
    if not wd.is_writer():
      return cls()
    tensorboard = _EventFile(logdir) if log_cfg.tensorboard else None
    wandb_run = None
    if log_cfg.wandb_project:
      try:
        import wandb
      except ImportError as e:
        raise ImportError(
            "logging.wandb_project is set but wandb is not installed: pip install -e '.[wandb]'"
        ) from e
      wandb_run = wandb.init(
          project=log_cfg.wandb_project,
          entity=log_cfg.wandb_entity or None,
          mode=log_cfg.wandb_mode,
          name=run_name,
          config=config,
          dir=None if storage.is_object_store(logdir) else os.path.dirname(logdir),
          resume="allow",
          id=_wandb_id(run_name, logdir),
      )
    return cls(tensorboard, wandb_run)

  def scalars(self, values: dict, step: int) -> None:
    finite = {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    if self._tensorboard is not None and finite:
      self._tensorboard.write(finite, step)
    if self._wandb is not None and finite:
      # W&B drops a step lower than one logged before: each tag group (train/, round/, ...)
      # gets its own x-axis, `<group>/step`, instead of the run's step
      by_group: dict[str, dict] = {}
      for tag, value in finite.items():
        by_group.setdefault(tag.split("/")[0], {})[tag] = value
      for group, values in by_group.items():
        if group not in self._wandb_groups:
          self._wandb.define_metric(f"{group}/*", step_metric=f"{group}/step")
          self._wandb_groups.add(group)
        self._wandb.log({**values, f"{group}/step": step})

  def round_record(self, record: dict, teacher_cost_usd: float | None = None) -> None:
    """One round's summary record (summary.records) at step = its round number."""
    values = {f"round/{k}": record[k] for k in ROUND_FIELDS if record.get(k) is not None}
    if teacher_cost_usd is not None:
      values["round/teacher_cost_usd"] = teacher_cost_usd
    self.scalars(values, record["round"])

  def sync(self) -> None:
    """What is written so far made visible where the workdir lives (an object store's upload)."""
    if self._tensorboard is not None:
      self._tensorboard.sync()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


class _EventFile:
  """TensorBoard events written as they come (tensorboardX's `EventsWriter`: no background
  thread, no flush at exit), each write flushed. On an object store (which cannot append) the
  file is written locally and uploaded whole by `sync` (every phase, and at most every
  `upload_every_s` while writing). A write that fails (a full disk) costs the run its scalars
  from then on, with one warning, never the run itself."""

  def __init__(self, logdir: str, upload_every_s: float = 60.0):
    self.logdir = logdir
    self._events = None
    self._staging = (
        tempfile.mkdtemp(prefix="tensorboard-") if storage.is_object_store(logdir) else None
    )
    self._upload_every_s = upload_every_s
    self._uploaded_at = time.monotonic()
    try:
      os.makedirs(self._staging or logdir, exist_ok=True)
      self._events = EventsWriter(os.path.join(self._staging or logdir, "events"))
    except OSError as e:
      self._give_up(e)

  def write(self, values: dict[str, float], step: int) -> None:
    if self._events is None:
      return
    summary = summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()]
    )
    try:
      self._events.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
      self._events.flush()
    except OSError as e:
      self._give_up(e)
    if time.monotonic() - self._uploaded_at > self._upload_every_s:
      self.sync()

  def sync(self) -> None:
    """The staged event file uploaded whole to the object store (nothing to do locally)."""
    if self._staging is None or self._events is None:
      return
    local = self._events._file_name
    try:
      with open(local, "rb") as f:
        storage.write_atomically(storage.join(self.logdir, os.path.basename(local)), f.read())
    except Exception as e:  # gcsfs and s3fs raise their own types
      self._give_up(e)
    self._uploaded_at = time.monotonic()

  def close(self) -> None:
    self.sync()
    if self._events is not None:
      try:
        self._events.close()
      except OSError as e:
        self._give_up(e)
      self._events = None
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)

  def _give_up(self, error: Exception) -> None:
    logging.warning(
        "TensorBoard events in %s are no longer written: %s", self.logdir, storage.root_cause(error)
    )
    events, self._events = self._events, None
    if events is not None:
      try:
        events.close()  # closes the file even when its last flush fails
      except OSError:
        pass


def _wandb_id(run_name: str, logdir: str) -> str:
  """One W&B run per workdir, so a resumed run continues its curves."""
  return f"{run_name[:40]}-{hashlib.sha1(storage.absolute(logdir).encode()).hexdigest()[:8]}"
