"""`python -m tailored_jax.report` on the session's reference run: every figure is the run's own."""

import json
import os

from tailored_jax import report


def _jsonl(workdir, *parts):
  with open(os.path.join(workdir, *parts)) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_report_shows_the_runs_figures_and_its_feedback_examples(reference, tmp_path):
  workdir, records = reference
  report.main(["--workdir", workdir, "--compare", workdir, "--samples", "2"])
  text = open(os.path.join(workdir, "report.md")).read()
  assert os.path.getsize(os.path.join(workdir, "report.png")) > 5_000
  for r in records:
    val, test = f"{100 * r['val_accuracy']:.1f}", f"{100 * r['test_accuracy']:.1f}"
    assert f"| {r['round']} | {val} | {test} | {val} | {test} |" in text
    assert f"| {r['round']} | {r['train_examples']} | {r['mistakes']} |" in text
  assert "| teacher.kind | local |" in text
  feedback = [
      d for d in _jsonl(workdir, "round_2", "teacher_data.jsonl") if d["source"] == "feedback"
  ]
  mistakes = {(m["qid"], m["output"]) for m in _jsonl(workdir, "round_1", "mistakes.jsonl")}
  assert feedback and all((d["qid"], d["student_output"]) in mistakes for d in feedback)
  assert all(d["feedback"] for d in feedback)  # the oracle always says what went wrong
  shown = report.feedback_examples(workdir, 2)
  assert len(shown) == 2 and text.count("**Teacher feedback.**") == 2
  assert not os.path.exists(os.path.join(workdir, "round_2", "exam_outcomes.jsonl"))
  for e in shown:  # the last round is not examined again
    assert e["next_exam_wrong"] is None and "**Next exam.** no later exam." in text
    assert f"**Student (wrong).** {' '.join(e['student'].split())}" in text
    assert f"**Teacher feedback.** {e['feedback']}" in text


def test_report_prices_each_rounds_teacher_tokens(reference, tmp_path):
  """With teacher.prices for the teacher's model, each round's paid tokens in USD."""
  import shutil

  workdir = str(tmp_path / "priced")
  shutil.copytree(reference[0], workdir, ignore=shutil.ignore_patterns("checkpoints"))
  config = json.load(open(os.path.join(workdir, "config.json")))
  config["teacher"]["prices"] = f"{config['teacher']['model']}=1.5/4"
  json.dump(config, open(os.path.join(workdir, "config.json"), "w"))
  report.main(["--workdir", workdir])
  text = open(os.path.join(workdir, "report.md")).read()
  for r in reference[1]:
    usage = json.load(open(os.path.join(workdir, f"round_{r['round']}", "teacher.json")))["usage"]
    usd = (usage["prompt_tokens"] * 1.5 + usage["completion_tokens"] * 4) / 1e6
    assert usd > 0 and f"| {r['teacher_tokens']:,} | {usd:.4f} |" in text


def test_report_of_an_unfinished_run_is_one_clear_line(tmp_path, capsys):
  import pytest

  with pytest.raises(SystemExit) as stop:
    report.main(["--workdir", str(tmp_path)])
  assert "config.json not found" in str(stop.value)


def test_feedback_examples_read_the_next_exam(tmp_path):
  root = tmp_path / "run"
  (root / "data").mkdir(parents=True)
  (root / "round_2").mkdir()
  (root / "config.json").write_text(json.dumps({"rounds": 3, "exam": {"num_samples": 4}}))
  (root / "data" / "train.jsonl").write_text(
      json.dumps({"id": "train-7", "question": "Q?", "gold": "5"}) + "\n"
  )
  (root / "round_2" / "teacher_data.jsonl").write_text(
      json.dumps({"qid": "train-7", "source": "annotation", "continuation": "x"})
      + "\n"
      + json.dumps(
          {
              "qid": "train-7",
              "source": "feedback",
              "continuation": " 2 + 3 = 5\nAnswer: 5",
              "student_output": "2 + 3 = 6",
              "feedback": "2 + 3 is 5.",
          }
      )
      + "\n"
  )
  (root / "round_2" / "exam_outcomes.jsonl").write_text(
      json.dumps({"qid": "train-7", "wrong": 1}) + "\n"
  )
  assert report.feedback_examples(str(root), 3) == [
      {
          "round": 1,
          "qid": "train-7",
          "question": "Q?",
          "gold": "5",
          "student": "2 + 3 = 6",
          "feedback": "2 + 3 is 5.",
          "teacher": " 2 + 3 = 5\nAnswer: 5",
          "next_exam_wrong": 1,
          "samples": 4,
      }
  ]
