"""Choosing the round to keep, and the terminal table."""

import os

from tailored_jax import summary


def test_best_round_is_chosen_on_validation_not_test():
  records = [
      {"round": 1, "val_accuracy": 0.5, "test_accuracy": 0.9},
      {"round": 2, "val_accuracy": 0.6, "test_accuracy": 0.1},
      {"round": 3, "val_accuracy": 0.6, "test_accuracy": 0.2},
  ]
  assert summary.best_round(records)["round"] == 3
  assert summary.best_round([]) is None


def test_a_run_whose_training_did_not_help_says_so():
  """The pilot: the initial student answered 1 of 25 validation questions, both trained
  rounds none; round 2 is kept (round 0 is no candidate) and the run says training lost."""
  records = [
      {"round": 0, "val_accuracy": 0.04},
      {"round": 1, "val_accuracy": 0.0},
      {"round": 2, "val_accuracy": 0.0},
  ]
  best = summary.best_round(records)
  assert best["round"] == 2
  assert summary.initial_ahead(records, best) == (
      "no trained round beat the initial student on validation (0.040 in round 0, 0.000 at "
      "best after)"
  )
  records[1]["val_accuracy"] = 0.04
  assert summary.initial_ahead(records, summary.best_round(records)) is None
  assert summary.initial_ahead(records[1:], summary.best_round(records[1:])) is None


def test_table_lists_every_round():
  records = [
      {
          "round": 1,
          "train_examples": 10,
          "mistakes": 0,
          "teacher_requests": 5,
          "teacher_tokens": 100,
          "val_accuracy": 0.25,
          "test_accuracy": None,
          "seconds": 3.5,
      }
  ]
  lines = summary.table(records).splitlines()
  assert lines[0].split() == list(summary.COLUMNS)
  assert lines[2].split() == ["1", "10", "0", "5", "100", "0.250", "-", "3.5"]


def test_mistakes_fixed_persistent_and_new_across_rounds(tmp_path):
  """A crafted workdir: exams after rounds 0, 1 and 2 with known wrong questions."""
  from tailored_jax import workdir as wd
  from tailored_jax.layout import Layout

  layout = Layout(str(tmp_path))
  exams = {
      0: {"a": 2, "b": 1, "c": 0, "d": 0},
      1: {"a": 0, "b": 3, "c": 1, "d": 0},
      2: {"a": 1, "b": 0, "c": 0, "d": 0},
  }
  for r, wrong in exams.items():
    wd.write_jsonl(
        layout.exam_outcomes(r), [{"qid": q, "samples": 4, "wrong": n} for q, n in wrong.items()]
    )
    wd.write_json(layout.exam_report(r), {"mistakes": sum(n > 0 for n in wrong.values())})
  state = wd.RunState(str(tmp_path))
  for r in (1, 2, 3):
    wd.write_json(layout.eval_report(r), {"val": {"accuracy": 0.1 * r}})
    wd.write_json(layout.train_report(r), {"examples": 10})
    wd.write_json(
        layout.teacher_report(r),
        {"usage": {"requests": 1}, "dropped": {"wrong_answer": r, "unparseable": 1}},
    )
    state.mark(f"evaluate_{r}")
  records = summary.records(layout, state, 3)
  moved = [(r["mistakes_fixed"], r["mistakes_persistent"], r["mistakes_new"]) for r in records]
  # round 1: a fixed, b persistent, c new; round 2: b and c fixed, a new; round 3: no exam after
  assert moved == [(1, 1, 1), (2, 0, 1), (None, None, None)]
  assert records[1]["teacher_rejected"] == {"unparseable": 1, "wrong_answer": 2}
  summary.write(layout, records)
  assert os.path.getsize(layout.summary_plot) > 1000


def test_plateau_stops_after_patience_rounds_without_improvement():
  assert summary.plateau([0.1, 0.2, 0.3], 1) is None
  assert summary.plateau([0.1, 0.3, 0.3], 1) == (
      "validation accuracy has not improved for 1 rounds (best 0.300 in round 2; "
      "method.stop_patience=1)"
  )
  assert summary.plateau([0.1, 0.3, 0.2], 2) is None
  assert "for 2 rounds" in summary.plateau([0.4, 0.3, 0.2], 2)
