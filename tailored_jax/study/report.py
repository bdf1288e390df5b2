"""A study's aggregates from its runs' outputs: study.json, the study.md table and study.png."""

from __future__ import annotations

import os

from tailored_jax import workdir as wd
from tailored_jax.layout import Layout
from tailored_jax.study import stats
from tailored_jax.study.runs import Run, read_summary

PER_ROUND = (
    "val_accuracy",
    "test_accuracy",
    "teacher_requests",
    "teacher_tokens",
    "optimizer_steps",
    "seconds",
)


def test_outcomes(run: Run, round_index: int) -> dict[str, bool]:
  """question id -> right, for the test split of one round of a run."""
  path = Layout(run.workdir).eval_records(round_index, "test")
  return {r["id"]: bool(r["correct"]) for r in wd.read_jsonl(path)}


def aggregate(runs: list[Run]) -> dict:
  """Per config: every run's summary, per-round means with 95% intervals over seeds (cumulative
  teacher tokens too); then each config against the first on the final round, paired by seed
  (mean difference and interval) and by question across the pooled runs (McNemar)."""
  by_config: dict[str, list[Run]] = {}
  for run in runs:
    by_config.setdefault(run.name, []).append(run)
  configs = {}
  for name, members in by_config.items():
    summaries = {run.seed: read_summary(run) for run in members}
    rounds = sorted({r["round"] for records in summaries.values() for r in records})
    per_round = []
    for round_index in rounds:
      row = {"round": round_index}
      present = [rs for rs in summaries.values() if any(r["round"] == round_index for r in rs)]
      for field in PER_ROUND + ("cumulative_teacher_tokens",):
        values = [_value(records, round_index, field) for records in present]
        values = [v for v in values if v is not None]
        if values:
          row[field] = stats.mean_interval(values)
      per_round.append(row)
    final = [records[-1] for records in summaries.values()]
    configs[name] = {
        "config": members[0].config_path,
        "seeds": [run.seed for run in members],
        "runs": {str(seed): records for seed, records in summaries.items()},
        "per_round": per_round,
        "final": {
            "round": stats.mean_interval([r["round"] for r in final]),
            "test_accuracy": stats.mean_interval([r["test_accuracy"] for r in final]),
            "val_accuracy": stats.mean_interval([r["val_accuracy"] for r in final]),
            "teacher_tokens": stats.mean_interval(
                [sum(x["teacher_tokens"] for x in records) for records in summaries.values()]
            ),
            "wall_seconds": stats.mean_interval(
                [sum(x["seconds"] for x in records) for records in summaries.values()]
            ),
        },
    }
  names = list(by_config)
  comparisons = {}
  first = by_config[names[0]]
  for name in names[1:]:
    comparisons[name] = compare(first, by_config[name])
  return {"configs": configs, "baseline": names[0], "comparisons": comparisons}


def compare(first: list[Run], second: list[Run]) -> dict:
  """`second` against `first` on each run's final round: seeds paired in order."""
  if len(first) != len(second):
    raise ValueError(f"{second[0].name} has {len(second)} runs, {first[0].name} {len(first)}")
  a_acc, b_acc, a_right, b_right = [], [], [], []
  for a, b in zip(first, second):
    a_last, b_last = read_summary(a)[-1], read_summary(b)[-1]
    a_acc.append(a_last["test_accuracy"])
    b_acc.append(b_last["test_accuracy"])
    a_out, b_out = test_outcomes(a, a_last["round"]), test_outcomes(b, b_last["round"])
    if sorted(a_out) != sorted(b_out):
      raise ValueError(f"{a.workdir} and {b.workdir} were tested on different questions")
    a_right += [a_out[q] for q in sorted(a_out)]
    b_right += [b_out[q] for q in sorted(a_out)]
  return {
      "test_accuracy_difference": stats.paired_difference(a_acc, b_acc),
      "per_question": stats.mcnemar_exact(a_right, b_right),
  }


def _value(records: list[dict], round_index: int, field: str):
  """A run's `field` at round `round_index` (records are read by their round number: round 0,
  the initial student, is there when the run evaluated it)."""
  if field == "cumulative_teacher_tokens":
    return sum(r["teacher_tokens"] for r in records if r["round"] <= round_index)
  row = next((r for r in records if r["round"] == round_index), None)
  return None if row is None else row.get(field)


def _pct(interval: dict) -> str:
  return (
      f"{100 * interval['mean']:.1f} [{100 * interval['low']:.1f}, "
      f"{100 * interval['high']:.1f}]"
  )


def _num(interval: dict) -> str:
  return f"{interval['mean']:,.0f}"


def markdown(result: dict) -> str:
  """The study table: per config and round, then the paired comparisons."""
  lines = [
      "| config | round | seeds | val acc % [95% CI] | test acc % [95% CI] | teacher requests | "
      "teacher tokens | optimizer steps | seconds |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, c in result["configs"].items():
    for row in c["per_round"]:
      cells = [
          name,
          str(row["round"]),
          str(row["test_accuracy"]["n"]),
          _pct(row["val_accuracy"]),
          _pct(row["test_accuracy"]),
          _num(row["teacher_requests"]),
          _num(row["teacher_tokens"]),
          _num(row["optimizer_steps"]) if "optimizer_steps" in row else "",
          _num(row["seconds"]),
      ]
      lines.append("| " + " | ".join(cells) + " |")
  lines += [
      "",
      f"Final round against `{result['baseline']}` (test accuracy; seeds paired in order; "
      "per-question test pooled over the seeds' test questions):",
      "",
      "| config | mean difference, points [95% CI] | discordant questions (baseline only / "
      "this only) | p-value | test |",
      "|---|---|---|---|---|",
  ]
  for name, comparison in result["comparisons"].items():
    d, q = comparison["test_accuracy_difference"], comparison["per_question"]
    lines.append(
        f"| {name} | {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        f" | {q['only_first_right']} / {q['only_second_right']} | {q['p_value']:.3g} | "
        f"{q['test']} |"
    )
  return "\n".join(lines) + "\n"


def plot(path: str, result: dict) -> None:
  """Test accuracy per round with 95% bands per config; beside it, accuracy against cumulative
  teacher tokens (the cost view)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (by_round, by_cost) = plt.subplots(1, 2, figsize=(11, 4))
  for name, c in result["configs"].items():
    rows = [r for r in c["per_round"] if "test_accuracy" in r]
    x = [r["round"] for r in rows]
    mean = [100 * r["test_accuracy"]["mean"] for r in rows]
    (line,) = by_round.plot(x, mean, marker="o", label=name)
    by_round.fill_between(
        x,
        [100 * r["test_accuracy"]["low"] for r in rows],
        [100 * r["test_accuracy"]["high"] for r in rows],
        alpha=0.2,
        color=line.get_color(),
    )
    by_cost.plot(
        [r["cumulative_teacher_tokens"]["mean"] for r in rows],
        mean,
        marker="o",
        color=line.get_color(),
        label=name,
    )
  by_round.set_xlabel("round")
  by_round.set_ylabel("test accuracy (%), mean and 95% interval over seeds")
  by_cost.set_xlabel("cumulative teacher tokens (mean over seeds)")
  by_cost.set_ylabel("test accuracy (%)")
  for ax in (by_round, by_cost):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  wd.write_figure(path, fig, dpi=120)
  plt.close(fig)


def write(study_dir: str, runs: list[Run]) -> dict:
  result = aggregate(runs)
  wd.write_json(os.path.join(study_dir, "study.json"), result)
  wd.write_text(os.path.join(study_dir, "study.md"), markdown(result))
  plot(os.path.join(study_dir, "study.png"), result)
  return result
