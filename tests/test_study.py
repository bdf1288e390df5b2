"""The study runner: its statistics by hand, a tiny 2-config × 2-seed study that resumes after a
kill, re-runs nothing, reproduces an ordinary run of the same seed, and reports what its runs'
outputs say."""

import json
import math
import os
import subprocess
import sys

import pytest
from scipy import stats as scipy_stats

from tailored_jax import rounds
from tailored_jax.study import report, runs, stats


def test_mean_interval_and_paired_difference_by_hand():
  got = stats.mean_interval([0.2, 0.3, 0.4])
  half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2 dof) x sd / sqrt(n)
  assert got["mean"] == pytest.approx(0.3) and got["sd"] == pytest.approx(0.1)
  assert (got["low"], got["high"]) == pytest.approx((0.3 - half, 0.3 + half), abs=1e-6)
  one = stats.mean_interval([0.5])
  assert (one["low"], one["high"]) == (0.5, 0.5)
  diff = stats.paired_difference([0.1, 0.2], [0.3, 0.5])  # differences 0.2 and 0.3
  assert diff["mean"] == pytest.approx(0.25)
  assert diff["high"] - diff["mean"] == pytest.approx(
      12.706205 * math.sqrt(0.005) / math.sqrt(2), abs=1e-6
  )


def test_mcnemar_exact_by_hand():
  got = stats.mcnemar_exact(
      [True, True, True, False, False, True], [False, False, False, False, True, True]
  )
  assert (got["only_first_right"], got["only_second_right"], got["pairs"]) == (3, 1, 6)
  assert got["p_value"] == pytest.approx(2 * 5 / 16)  # P(X <= 1 | n=4, 1/2) = 5/16, two-sided
  assert stats.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0


CONFIG = """
from tests.test_rounds import tiny_config
def get_config():
  c = tiny_config()
  c.rounds = {rounds}
  return c
"""


def test_a_tiny_study_resumes_reruns_nothing_and_reports_its_runs(tmp_path, reference, monkeypatch):
  baseline, full = tmp_path / "one_round.py", tmp_path / "two_rounds.py"
  baseline.write_text(CONFIG.format(rounds=1))
  full.write_text(CONFIG.format(rounds=2))  # tiny_config itself: the reference run's config
  study = str(tmp_path / "study")
  configs = [str(baseline), str(full)]
  plan = runs.plan(configs, 2, study, {str(baseline): 42, str(full): 42})
  assert [(r.name, r.seed) for r in plan] == [
      ("one_round", 42),
      ("one_round", 43),
      ("two_rounds", 42),
      ("two_rounds", 43),
  ]
  real_run, calls = rounds.run, []

  def killed_at_the_third(cfg, workdir):
    calls.append(workdir)
    if len(calls) == 3:
      raise KeyboardInterrupt  # the study is killed as its third run starts
    return real_run(cfg, workdir)

  monkeypatch.setattr(rounds, "run", killed_at_the_third)
  with pytest.raises(KeyboardInterrupt):
    runs.run_all(plan, [])
  monkeypatch.setattr(rounds, "run", real_run)
  assert runs.run_all(plan, []) == 2  # resumed: the two runs not finished
  assert runs.run_all(plan, []) == 0  # a second invocation runs nothing new

  # same seed, same results: the study's two_rounds/seed_42 is the reference run
  strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
  assert strip(runs.read_summary(plan[2])) == strip(reference[1])
  # different seeds, different runs
  teacher = lambda run: (tmp_path / run.workdir / "round_1" / "teacher_data.jsonl").read_text()
  assert teacher(plan[2]) != teacher(plan[3])

  result = report.write(study, plan)
  for name, members in (("one_round", plan[:2]), ("two_rounds", plan[2:])):
    summaries = [runs.read_summary(r) for r in members]
    row = result["configs"][name]["per_round"][0]
    values = [s[0]["test_accuracy"] for s in summaries]
    mean = sum(values) / 2
    half = scipy_stats.t.ppf(0.975, 1) * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)
    assert row["test_accuracy"]["mean"] == pytest.approx(mean)
    assert row["test_accuracy"]["high"] == pytest.approx(mean + half)
    assert row["teacher_tokens"]["mean"] == pytest.approx(
        sum(s[0]["teacher_tokens"] for s in summaries) / 2
    )
  last = lambda run: runs.read_summary(run)[-1]["test_accuracy"]
  comparison = result["comparisons"]["two_rounds"]
  assert comparison["test_accuracy_difference"]["mean"] == pytest.approx(
      (last(plan[2]) - last(plan[0]) + last(plan[3]) - last(plan[1])) / 2
  )
  outcomes = lambda run, r: [
      json.loads(line)["correct"]
      for line in (tmp_path / run.workdir / f"round_{r}" / "eval_test.jsonl")
      .read_text()
      .split("\n")
      if line
  ]
  first = outcomes(plan[0], 1) + outcomes(plan[1], 1)
  second = outcomes(plan[2], 2) + outcomes(plan[3], 2)
  assert comparison["per_question"]["only_second_right"] == sum(
      1 for a, b in zip(first, second) if b and not a
  )
  table = open(os.path.join(study, "study.md")).read()
  assert "| two_rounds | 2 | 2 | " in table
  assert os.path.getsize(os.path.join(study, "study.png")) > 10_000

  # the command line: finds everything done, runs nothing, prints the table
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "tailored_jax.study",
          f"--configs={baseline},{full}",
          "--seeds=2",
          f"--workdir={study}",
      ],
      capture_output=True,
      text=True,
      check=True,
      cwd=os.getcwd(),
  )
  assert out.stdout.count("| one_round |") == 1 and out.stderr.count("done before, skipped") == 4
  other = subprocess.run(
      [
          sys.executable,
          "-m",
          "tailored_jax.study",
          f"--configs={full}",
          "--seeds=2",
          f"--workdir={study}",
      ],
      capture_output=True,
      text=True,
  )
  assert other.returncode != 0 and "holds a study of" in other.stderr


def test_the_paper_grid_expands_to_valid_arms_and_matches_the_plain_budget(tmp_path):
  """--grid=paper: every arm is a valid config of the base (a pretrained student), each
  evaluates round 0 (the prompting baseline); plain distillation asks as many rationales per
  question as spend the full method's mean teacher tokens."""
  from tailored_jax.study import grid

  base = os.path.join(
      os.path.dirname(os.path.dirname(__file__)), "configs", "gsm8k_smollm2_human_rounds.py"
  )
  first = grid.arms(base, 2, str(tmp_path), 7, stage=1)
  assert [(r.name, r.seed) for r in first][::2] == [
      ("tailored_reflection", 7),
      ("tailored_rounds", 7),
      ("answer_only", 7),
      ("star", 7),
  ]
  override = ["--config.model.init_from=/models/smollm2"]  # validation does not open it
  for run in first:
    cfg = runs.load_config(run, override)
    assert cfg.eval.initial is True and cfg.seed == run.seed
  star = runs.load_config(first[-1], override)
  assert star.teacher.kind == "self" and not star.method.self_reflection
  for run, (total, annotate) in zip(first[:2], ((2600, 400), (2200, 400))):
    os.makedirs(os.path.join(run.workdir, "round_1"))
    with open(os.path.join(run.workdir, "round_1", "teacher.json"), "w") as f:
      json.dump({"usage": {"tokens": annotate}, "questions": 10}, f)
    os.makedirs(os.path.join(run.workdir, "round_2"))
    with open(os.path.join(run.workdir, "round_2", "teacher.json"), "w") as f:
      json.dump({"usage": {"tokens": total - annotate}}, f)
  plain, k = grid.plain_arm(base, 2, str(tmp_path), 7, first[:2], 4)
  assert k == 24  # mean 2400 tokens at 10 per rationale, 10 questions
  cfg = runs.load_config(plain[0], override)
  assert (cfg.rounds, cfg.teacher.num_rationales, cfg.method.feedback) == (1, 24, False)
  assert grid.matched_rationales(100, 400, 10, 4) == 4  # never fewer than the base asks


def test_the_paper_grid_runs_every_arm_on_a_small_task(tmp_path):
  """`study --grid=paper` on the tiny synthetic task: every arm runs (STaR keeps a student that
  answers nothing right untrained), each with round 0, and the report pairs them with plain
  distillation."""
  base = tmp_path / "tiny.py"
  base.write_text(CONFIG.format(rounds=2))
  study = tmp_path / "grid"
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "tailored_jax.study",
          "--grid=paper",
          f"--config={base}",
          "--seeds=1",
          f"--workdir={study}",
      ],
      capture_output=True,
      text=True,
      cwd=os.getcwd(),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((study / "study.json").read_text())
  arms = ["plain_distillation", "tailored_reflection", "tailored_rounds", "answer_only", "star"]
  assert list(result["configs"]) == arms
  assert sorted(result["comparisons"]) == sorted(arms[1:])
  for arm in arms:
    summary = json.loads((study / arm / "seed_42" / "summary.json").read_text())
    assert summary[0]["round"] == 0  # the prompting baseline
    rows = result["configs"][arm]["per_round"]  # read by round number, round 0 first
    assert [row["round"] for row in rows] == [r["round"] for r in summary]
    for row, record in zip(rows, summary):
      assert row["test_accuracy"]["mean"] == record["test_accuracy"]
  star = json.loads((study / "star" / "seed_42" / "round_1" / "train.json").read_text())
  assert star["steps"] == 0  # nothing right to learn from at round 0


def test_study_rounds_are_read_by_number_when_round_0_is_there(tmp_path):
  """Round 0 (the initial student) shifts a run's records by one: each round's figures are read
  by its round number, not its position."""
  members = []
  for seed, shift in ((1, 0.0), (2, 0.1)):
    run = runs.Run("x.py", seed, str(tmp_path / f"seed_{seed}"))
    os.makedirs(run.workdir)
    records = [
        {
            "round": r,
            "test_accuracy": 0.1 * r + shift,
            "val_accuracy": 0.2 * r,
            "teacher_tokens": 100 * r,
            "train_examples": r,
            "mistakes": 0,
            "seconds": 1.0,
        }
        for r in (0, 1, 2)
    ]
    with open(os.path.join(run.workdir, "summary.json"), "w") as f:
      json.dump(records, f)
    members.append(run)
  rows = report.aggregate(members)["configs"]["x"]["per_round"]
  assert [row["round"] for row in rows] == [0, 1, 2]
  assert [row["test_accuracy"]["mean"] for row in rows] == pytest.approx([0.05, 0.15, 0.25])
  assert [row["cumulative_teacher_tokens"]["mean"] for row in rows] == [0, 100, 300]
