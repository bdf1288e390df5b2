"""`python -m tailored_jax.score --task=TASK --predictions=FILE [--data=PATH] [--split=test]`.

Scores a JSONL of {"id", "output"} or {"question", "output"} against the task's gold answers
with the same code the round loop uses, and prints accuracy and error counts as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import ml_collections

from tailored_jax import config_lib
from tailored_jax.data import scoring
from tailored_jax.data.sources import DataError, field, iter_records
from tailored_jax.data.tasks import build_task


def _key(question: str) -> str:
  return " ".join(question.split())


def score_file(task, split: str, predictions_path: str) -> dict:
  examples = task.splits()[split]
  by_id = {e.id: e for e in examples}
  by_question = {_key(e.question): e for e in examples}
  matched, outputs, seen = [], [], {}
  for where, record in iter_records(predictions_path):
    output = field(record, "output", where)
    if isinstance(record, dict) and "id" in record:
      example = by_id.get(str(record["id"]))
      if example is None:
        raise DataError(f"{where}: id {record['id']!r} is not in {task.name} {split}")
    else:
      question = field(record, "question", where)
      example = by_question.get(_key(question))
      if example is None:
        raise DataError(f"{where}: question not found in {task.name} {split}: {question[:80]!r}")
    if example.id in seen:
      raise DataError(
          f"{where}: a second output for question {example.id!r} (line "
          f"{seen[example.id]}); each question is scored once"
      )
    seen[example.id] = where
    matched.append(example)
    outputs.append(output)
  _, summary = scoring.score(task, matched, outputs)
  return dict(summary, task=task.name, split=split, examples_in_split=len(examples))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--task", required=True)
  parser.add_argument("--predictions", required=True)
  parser.add_argument("--data", default="", help="folder with the task's original files")
  parser.add_argument("--split", default="test", choices=["train", "val", "test"])
  args = parser.parse_args(argv)
  cfg: ml_collections.ConfigDict = config_lib.base_config().task
  cfg.name, cfg.data_path = args.task, args.data
  try:
    print(json.dumps(score_file(build_task(cfg), args.split, args.predictions), indent=2))
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
