"""Scoring model outputs against gold answers, shared by evaluation, the exam and `score`."""

from __future__ import annotations

from collections import Counter

from tailored_jax.data import answers
from tailored_jax.data.tasks import Example, Task


def score_output(task: Task, example: Example, output: str) -> dict:
  extraction = task.extract(output)
  correct = answers.is_correct(extraction.answer, example.gold, task.numeric_equality)
  error = None if correct else (extraction.error or "wrong_answer")
  return {
      "id": example.id,
      "gold": example.gold,
      "answer": extraction.answer,
      "correct": correct,
      "error": error,
      "output": output,
      "rationale": extraction.rationale,
  }


def score(task: Task, examples: list[Example], outputs: list[str]) -> tuple[list[dict], dict]:
  """Per-example records and {accuracy, correct, total, errors: {type: count}}."""
  if len(examples) != len(outputs):
    raise ValueError(f"{len(outputs)} outputs for {len(examples)} examples")
  ids = [e.id for e in examples]
  if len(set(ids)) != len(ids):
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    raise ValueError(f"each question counts once; repeated ids: {repeated[:5]}")
  records = [score_output(task, e, o) for e, o in zip(examples, outputs)]
  correct = sum(r["correct"] for r in records)
  errors = Counter(r["error"] for r in records if r["error"])
  return records, {
      "accuracy": correct / max(len(records), 1),
      "correct": correct,
      "total": len(records),
      "errors": dict(sorted(errors.items())),
  }
