"""The end-of-run report: summary.json (one record per round), summary.png and a terminal table."""

from __future__ import annotations

import math
import os

from tailored_jax import config_lib, storage
from tailored_jax import workdir as wd
from tailored_jax.layout import Layout

COLUMNS = (
    "round",
    "train_examples",
    "mistakes",
    "teacher_requests",
    "teacher_tokens",
    "val_accuracy",
    "test_accuracy",
    "seconds",
)


def best_round(records: list[dict]) -> dict | None:
  """The trained round to keep, chosen on validation accuracy (never test); ties go to the later
  round. Round 0 (the initial student, when evaluated) is the baseline, not a candidate."""
  scored = [
      r
      for r in records
      if r["round"] > 0 and r.get("val_accuracy") is not None and math.isfinite(r["val_accuracy"])
  ]
  if not scored:
    return None
  best = max(scored, key=lambda r: (r["val_accuracy"], r["round"]))
  return {
      "round": best["round"],
      "val_accuracy": best["val_accuracy"],
      "test_accuracy": best.get("test_accuracy"),
      "checkpoint": os.path.relpath(Layout("").params_dir(best["round"])),
  }


def initial_ahead(records: list[dict], best: dict | None) -> str | None:
  """A warning when the initial student (round 0) scored higher on validation than the best
  trained round: training did not help, whatever round is kept."""
  initial = next((r for r in records if r["round"] == 0), None)
  if best is None or initial is None or initial.get("val_accuracy") is None:
    return None
  if initial["val_accuracy"] <= best["val_accuracy"]:
    return None
  return (
      f"no trained round beat the initial student on validation "
      f"({initial['val_accuracy']:.3f} in round 0, {best['val_accuracy']:.3f} at best after)"
  )


def plateau(val_accuracies: list[float], patience: int) -> str | None:
  """Why to stop after the last round when validation accuracy has not improved on its best
  for `patience` rounds, else None."""
  best = max(range(len(val_accuracies)), key=lambda i: (val_accuracies[i], -i))
  if len(val_accuracies) - 1 - best >= patience:
    return (
        f"validation accuracy has not improved for {len(val_accuracies) - 1 - best} rounds "
        f"(best {val_accuracies[best]:.3f} in round {best + 1}; "
        f"method.stop_patience={patience})"
    )
  return None


def mistake_transitions(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
  """Questions wrong (≥ 1 wrong sample) in the exam before a round and in the one after it:
  fixed (wrong, then right), persistent (wrong both times) and new (right, then wrong)."""
  wrong_before = {q for q, n in before.items() if n}
  wrong_after = {q for q, n in after.items() if n}
  return {
      "fixed": len(wrong_before - wrong_after),
      "persistent": len(wrong_before & wrong_after),
      "new": len(wrong_after - wrong_before),
  }


def _wrong_counts(path: str) -> dict[str, int] | None:
  if not storage.exists(path):
    return None
  return {r["qid"]: int(r["wrong"]) for r in wd.read_jsonl(path)}


def teacher_cost_usd(
    layout: Layout, r: int, price: tuple[float, float] | None, batch_discount: float = 0.5
) -> float | None:
  """What round r's teacher data cost in USD (tokens paid in this run at `price`, USD per
  million prompt and completion tokens; batch tokens at `batch_discount` of it); None without
  a price or a teacher report."""
  path = layout.teacher_report(r)
  if not price or not storage.exists(path):
    return None
  return config_lib.usage_cost_usd(price, wd.read_json(path)["usage"], batch_discount)


def teacher_batch_cost_usd(
    layout: Layout, r: int, price: tuple[float, float] | None, batch_discount: float
) -> float | None:
  """The part of `teacher_cost_usd` paid through provider batches."""
  path = layout.teacher_report(r)
  if not price or not storage.exists(path):
    return None
  usage = wd.read_json(path)["usage"]
  return batch_discount * config_lib.cost_usd(
      price, usage.get("batch_prompt_tokens", 0), usage.get("batch_completion_tokens", 0)
  )


def records(layout: Layout, state: wd.RunState, rounds: int) -> list[dict]:
  """One record per round whose evaluation is done, read from the phase outputs; round 0 (the
  initial student, nothing trained) when the run evaluated it."""
  timings = wd.read_json(layout.timings) if storage.exists(layout.timings) else {}
  stop = wd.read_json(layout.stop) if storage.exists(layout.stop) else {}
  out = []
  if state.done("evaluate_0"):
    evals = wd.read_json(layout.eval_report(0))
    out.append(
        {
            "round": 0,
            "train_examples": 0,
            "optimizer_steps": 0,
            "mistakes": None,
            "teacher_requests": 0,
            "teacher_tokens": 0,
            "mistakes_fixed": None,
            "mistakes_persistent": None,
            "mistakes_new": None,
            "teacher_rejected": {},
            "stop_reason": None,
            "val_accuracy": evals.get("val", {}).get("accuracy"),
            "test_accuracy": evals.get("test", {}).get("accuracy"),
            "seconds": round(timings.get("evaluate_0", 0.0), 1),
        }
    )
  for r in range(1, rounds + 1):
    if not state.done(f"evaluate_{r}"):
      break
    evals = wd.read_json(layout.eval_report(r))
    teacher_path = layout.teacher_report(r)
    teacher = wd.read_json(teacher_path)["usage"] if storage.exists(teacher_path) else {}
    train = wd.read_json(layout.train_report(r))
    exam_path = layout.exam_report(r - 1)
    before, after = _wrong_counts(layout.exam_outcomes(r - 1)), _wrong_counts(
        layout.exam_outcomes(r)
    )
    moved = mistake_transitions(before, after) if before is not None and after is not None else {}
    rejected = wd.read_json(teacher_path).get("dropped", {}) if storage.exists(teacher_path) else {}
    out.append(
        {
            "round": r,
            "train_examples": train["examples"],
            "optimizer_steps": train.get("steps"),
            "mistakes": wd.read_json(exam_path)["mistakes"] if storage.exists(exam_path) else 0,
            "teacher_requests": teacher.get("requests", 0) + teacher.get("cache_hits", 0),
            "teacher_tokens": teacher.get("tokens", 0) + teacher.get("cached_tokens", 0),
            "mistakes_fixed": moved.get("fixed"),
            "mistakes_persistent": moved.get("persistent"),
            "mistakes_new": moved.get("new"),
            "teacher_rejected": dict(sorted(rejected.items())),
            "stop_reason": stop.get("reason") if stop.get("round") == r else None,
            "val_accuracy": evals.get("val", {}).get("accuracy"),
            "test_accuracy": evals.get("test", {}).get("accuracy"),
            "seconds": round(
                sum(
                    timings.get(f"{phase}_{r}", 0.0)
                    for phase in ("train", "evaluate", "exam", "feedback")
                )
                + (timings.get("annotate", 0.0) if r == 1 else 0.0),
                1,
            ),
        }
    )
  return out


def write(layout: Layout, records: list[dict]) -> None:
  wd.write_json(layout.summary, records)
  wd.write_json(layout.best_round, best_round(records))
  plot(layout.summary_plot, records)


def plot(path: str, records: list[dict]) -> None:
  """Accuracy per round; beside it, where exams before and after a round exist, how many
  questions the round fixed, left wrong and newly got wrong."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rounds = [r["round"] for r in records]
  fig, (ax, mistakes_ax) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=120)
  for key, label in (("val_accuracy", "validation"), ("test_accuracy", "test")):
    values = [r.get(key) for r in records]
    if any(v is not None for v in values):
      ax.plot(
          rounds,
          [100 * v if v is not None else float("nan") for v in values],
          marker="o",
          label=label,
      )
  ax.set_xlabel("round")
  ax.set_ylabel("accuracy (%)")
  ax.set_xticks(rounds)
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("Student accuracy per round")
  width = 0.27
  for i, (key, label) in enumerate(
      (("mistakes_fixed", "fixed"), ("mistakes_persistent", "persistent"), ("mistakes_new", "new"))
  ):
    mistakes_ax.bar(
        [x + (i - 1) * width for x in rounds],
        [r.get(key) or 0 for r in records],
        width,
        label=label,
    )
  mistakes_ax.set_xlabel("round")
  mistakes_ax.set_ylabel("train questions")
  mistakes_ax.set_xticks(rounds)
  mistakes_ax.grid(alpha=0.3, axis="y")
  mistakes_ax.legend()
  mistakes_ax.set_title("Exam mistakes: before vs after the round")
  fig.tight_layout()
  wd.write_figure(path, fig)
  plt.close(fig)


def table(records: list[dict]) -> str:

  def cell(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.3f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)

  rows = [list(COLUMNS)] + [[cell(r.get(c)) for c in COLUMNS] for r in records]
  widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
