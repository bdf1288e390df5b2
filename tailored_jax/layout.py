"""Every path of a run's workdir, named once (round loop, summary, student loading, reports)."""

from __future__ import annotations

import dataclasses

from tailored_jax import storage


@dataclasses.dataclass(frozen=True)
class Layout:
  root: str

  def path(self, *parts: str) -> str:
    return storage.join(self.root, *parts)

  # ---- the run ----------------------------------------------------------------------------------
  @property
  def config(self) -> str:
    return self.path("config.json")

  @property
  def state(self) -> str:
    return self.path("state.json")

  @property
  def timings(self) -> str:
    return self.path("timings.json")

  @property
  def tokenizer(self) -> str:
    return self.path("tokenizer.json")

  @property
  def teacher_cache(self) -> str:
    return self.path("teacher_cache.jsonl")

  @property
  def teacher_batches(self) -> str:
    """The manifest of the run's provider batches (teacher.mode=batch)."""
    return self.path("teacher_batches.json")

  @property
  def tensorboard(self) -> str:
    """TensorBoard event files (`tensorboard --logdir WORKDIR/tensorboard`)."""
    return self.path("tensorboard")

  @property
  def summary(self) -> str:
    return self.path("summary.json")

  @property
  def summary_plot(self) -> str:
    return self.path("summary.png")

  @property
  def best_round(self) -> str:
    return self.path("best_round.json")

  @property
  def stop(self) -> str:
    """Why the run ended before `rounds`, when the stop rule fired."""
    return self.path("stop.json")

  def data(self, split: str) -> str:
    return self.path("data", f"{split}.jsonl")

  # ---- per round --------------------------------------------------------------------------------
  def round_dir(self, r: int) -> str:
    return self.path(f"round_{r}")

  def teacher_data(self, r: int) -> str:
    """D_r: the teacher rationales round r trains on first (annotation for r = 1)."""
    return self.path(f"round_{r}", "teacher_data.jsonl")

  def teacher_report(self, r: int) -> str:
    return self.path(f"round_{r}", "teacher.json")

  def mistakes(self, r: int) -> str:
    """N_r: the distinct wrong exam rationales of the student after round r."""
    return self.path(f"round_{r}", "mistakes.jsonl")

  def own_rationales(self, r: int) -> str:
    """STaR (teacher.kind=self): the student's right rationales after round r, rationalized too."""
    return self.path(f"round_{r}", "own_rationales.jsonl")

  def exam_outcomes(self, r: int) -> str:
    """Per train question: how many of the exam's samples after round r were wrong."""
    return self.path(f"round_{r}", "exam_outcomes.jsonl")

  def exam_report(self, r: int) -> str:
    return self.path(f"round_{r}", "exam.json")

  def train_report(self, r: int) -> str:
    return self.path(f"round_{r}", "train.json")

  def eval_report(self, r: int) -> str:
    return self.path(f"round_{r}", "eval.json")

  def eval_records(self, r: int, split: str) -> str:
    return self.path(f"round_{r}", f"eval_{split}.jsonl")

  # ---- checkpoints ------------------------------------------------------------------------------
  def params_dir(self, r: int) -> str:
    """The weights after round r: what later rounds, export and generate start from."""
    return self.path("checkpoints", f"round_{r}")

  def step_dir(self, r: int) -> str:
    """Mid-round train-state checkpoints of round r (removed once the round is saved)."""
    return self.path("checkpoints", f"train_round_{r}")

  def optimizer_dir(self, r: int) -> str:
    """Round r's final step and AdamW state (`method.fresh_optimizer=False` only)."""
    return self.path("checkpoints", f"optimizer_round_{r}")

  @classmethod
  def of_params_dir(cls, params_dir: str) -> "Layout":
    """The layout of the workdir a `params_dir` belongs to."""
    return cls(storage.parent(storage.parent(storage.absolute(params_dir))))
