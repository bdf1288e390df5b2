"""Choosing the round to keep, and the terminal table."""
from tailored_jax import summary


def test_best_round_is_chosen_on_validation_not_test():
  records = [{"round": 1, "val_accuracy": 0.5,
              "test_accuracy": 0.9}, {"round": 2, "val_accuracy": 0.6, "test_accuracy": 0.1},
             {"round": 3, "val_accuracy": 0.6, "test_accuracy": 0.2}]
  assert summary.best_round(records)["round"] == 3
  assert summary.best_round([]) is None


def test_table_lists_every_round():
  records = [{
      "round": 1, "train_examples": 10, "mistakes": 0, "teacher_requests": 5, "teacher_tokens": 100,
      "val_accuracy": 0.25, "test_accuracy": None, "seconds": 3.5
  }]
  lines = summary.table(records).splitlines()
  assert lines[0].split() == list(summary.COLUMNS)
  assert lines[2].split() == ["1", "10", "0", "5", "100", "0.250", "-", "3.5"]
