"""`python -m tailored_jax.report --workdir=DIR [--compare=DIR2] [--samples=5]`: a run's report as
Markdown with a PNG beside it (DIR/report.md, DIR/report.png): the config, accuracy per round
(and the compared run's), mistakes fixed/persistent/new, teacher cost per round, and sampled
questions showing the student's wrong rationale, the tailored feedback and what the next exam
made of the question. Everything is read from the run's own files; nothing is recomputed."""

from __future__ import annotations

import argparse
import hashlib
import sys

from tailored_jax import config_lib, storage, summary
from tailored_jax import workdir as wd
from tailored_jax.layout import Layout

CONFIG_FIELDS = (
    "task.name",
    "model.init_from",
    "model.family",
    "rounds",
    "seed",
    "method.feedback",
    "method.self_reflection",
    "teacher.kind",
    "teacher.model",
    "teacher.num_rationales",
    "exam.num_samples",
    "train.epochs",
    "train.lr",
)


def _field(config: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(config, dict) or part not in config:
      return None
    config = config[part]
  return config


def _streamed(workdir: str, records: list[dict]) -> list[str]:
  """Per round whose exam streamed its mistakes: requests, teacher seconds hidden behind the
  decoding (the time saved against asking after the exam), the wait after it."""
  out = []
  for r in records:
    path = Layout(workdir).exam_report(r["round"])
    if not storage.exists(path):
      continue
    stream = wd.read_json(path).get("feedback_stream")
    if stream and stream["requests"]:
      out.append(
          f"round {r['round']}: {stream['requests']} requests, {stream['overlap_s']:.1f} s of "
          f"teacher time hidden behind decoding, {stream['wait_after_decoding_s']:.1f} s waited "
          "after it"
      )
  return out


def _pct(value) -> str:
  return "—" if value is None else f"{100 * value:.1f}"


def _read_run(workdir: str) -> tuple[dict, list[dict]]:
  layout = Layout(workdir)
  for path in (layout.config, layout.summary):
    if not storage.exists(path):
      raise FileNotFoundError(f"{path} not found: is {workdir} a finished run?")
  return wd.read_json(layout.config), wd.read_json(layout.summary)


def _outcomes(layout: Layout, r: int) -> dict[str, int] | None:
  path = layout.exam_outcomes(r)
  return {o["qid"]: int(o["wrong"]) for o in wd.read_jsonl(path)} if storage.exists(path) else None


def feedback_examples(workdir: str, samples: int) -> list[dict]:
  """Up to `samples` questions per feedback round, chosen by a hash of their id (stable across
  runs): the question, gold, the student's wrong rationale, the teacher's feedback and rationale,
  and how many of the next exam's samples were wrong (None if there was no next exam)."""
  layout = Layout(workdir)
  questions = {}
  data_path = layout.data("train")
  if storage.exists(data_path):
    questions = {q["id"]: q for q in wd.read_jsonl(data_path)}
  config = wd.read_json(layout.config)
  k = _field(config, "exam.num_samples")
  shown = []
  for r in range(2, int(config["rounds"]) + 2):
    path = layout.teacher_data(r)
    if not storage.exists(path):
      continue
    records = [d for d in wd.read_jsonl(path) if d.get("source") == "feedback"]
    first_per_question = {}
    for d in records:
      first_per_question.setdefault(d["qid"], d)
    chosen = sorted(
        first_per_question.values(), key=lambda d: hashlib.sha256(d["qid"].encode()).hexdigest()
    )[:samples]
    after = _outcomes(layout, r)
    for d in chosen:
      question = questions.get(d["qid"], {})
      shown.append(
          {
              "round": r - 1,
              "qid": d["qid"],
              "question": question.get("question", ""),
              "gold": question.get("gold", ""),
              "student": d.get("student_output", ""),
              "feedback": d.get("feedback", ""),
              "teacher": d["continuation"],
              "next_exam_wrong": None if after is None else after.get(d["qid"]),
              "samples": k,
          }
      )
  return shown


def markdown(workdir: str, compare: str | None, samples: int, plot_name: str | None) -> str:
  config, records = _read_run(workdir)
  other = _read_run(compare)[1] if compare else None
  lines = [f"# Run report: `{workdir}`", "", "## Config", "", "| field | value |", "|---|---|"]
  lines += [f"| {f} | {_field(config, f)} |" for f in CONFIG_FIELDS]
  lines += ["", "## Accuracy per round (%)", ""]
  header = "| round | val | test |"
  rule = "|---|---|---|"
  if other is not None:
    header += " compared val | compared test |"
    rule += "---|---|"
  lines += [header, rule]
  by_round = lambda rs: {r["round"]: r for r in rs or []}
  mine_by, theirs_by = by_round(records), by_round(other)
  for r in sorted(set(mine_by) | set(theirs_by)):  # round 0: the initial student, if evaluated
    mine = mine_by.get(r, {})
    row = f"| {r} | {_pct(mine.get('val_accuracy'))} | {_pct(mine.get('test_accuracy'))} |"
    if other is not None:
      theirs = theirs_by.get(r, {})
      row += f" {_pct(theirs.get('val_accuracy'))} | {_pct(theirs.get('test_accuracy'))} |"
    lines.append(row)
  if compare:
    lines += ["", f"Compared run: `{compare}`."]
  if plot_name:
    lines += ["", f"![accuracy per round]({plot_name})"]
  lines += [
      "",
      "## Mistakes and teacher cost per round",
      "",
      "| round | train examples | exam mistakes | fixed | persistent | new | teacher requests | "
      "teacher tokens | teacher USD | teacher replies rejected |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  price = config_lib.parse_prices(_field(config, "teacher.prices") or "").get(
      _field(config, "teacher.model")
  )
  discount = _field(config, "teacher.batch_discount") or 0.5
  for r in records:
    cost = summary.teacher_cost_usd(Layout(workdir), r["round"], price, discount)
    batch_cost = summary.teacher_batch_cost_usd(Layout(workdir), r["round"], price, discount)
    rejected = ", ".join(f"{k} {v}" for k, v in (r.get("teacher_rejected") or {}).items()) or "—"
    cells = [
        r["round"],
        r["train_examples"],
        r["mistakes"],
        r.get("mistakes_fixed"),
        r.get("mistakes_persistent"),
        r.get("mistakes_new"),
        r["teacher_requests"],
        f"{r['teacher_tokens']:,}",
        None
        if cost is None
        else f"{cost:.4f}" + (f" (batch {batch_cost:.4f})" if batch_cost else ""),
        rejected,
    ]
    lines.append("| " + " | ".join("—" if c is None else str(c) for c in cells) + " |")
  streamed = _streamed(workdir, records)
  if streamed:
    lines += [
        "",
        "Feedback streamed during the exam (`teacher.stream_feedback`): "
        + "; ".join(streamed)
        + ".",
    ]
  stop = next((r["stop_reason"] for r in records if r.get("stop_reason")), None)
  if stop:
    lines += ["", f"Stopped early: {stop}."]
  examples = feedback_examples(workdir, samples)
  if examples:
    lines += ["", "## Mistakes, feedback and the next exam", ""]
  for e in examples:
    if e["next_exam_wrong"] is None:
      after = "no later exam"
    elif e["next_exam_wrong"] == 0:
      after = f"right in all {e['samples']} samples"
    else:
      after = f"wrong in {e['next_exam_wrong']} of {e['samples']} samples"
    lines += [
        f"### {e['qid']} (exam after round {e['round']})",
        "",
        f"**Question.** {e['question']}",
        f"(gold: {e['gold']})",
        "",
        f"**Student (wrong).** {' '.join(e['student'].split())}",
        "",
        f"**Teacher feedback.** {e['feedback'] or '—'}",
        "",
        f"**Teacher rationale (trained on next round).** {' '.join(e['teacher'].split())}",
        "",
        f"**Next exam.** {after}.",
        "",
    ]
  return "\n".join(lines).rstrip() + "\n"


def plot(path: str, workdir: str, compare: str | None) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  runs = [(workdir, "-")] + ([(compare, "--")] if compare else [])
  for run, style in runs:
    records = _read_run(run)[1]
    rounds = [r["round"] for r in records]
    for key, label in (("val_accuracy", "val"), ("test_accuracy", "test")):
      ax.plot(
          rounds,
          [100 * (r.get(key) or float("nan")) for r in records],
          style,
          marker="o",
          label=f"{storage.name(run)} {label}",
      )
  ax.set_xlabel("round")
  ax.set_ylabel("accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  wd.write_figure(path, fig, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--compare", default=None, help="a baseline run's workdir")
  parser.add_argument("--samples", type=int, default=5, help="questions shown per feedback round")
  args = parser.parse_args(argv)
  try:
    plot(storage.join(args.workdir, "report.png"), args.workdir, args.compare)
    text = markdown(args.workdir, args.compare, args.samples, "report.png")
  except (FileNotFoundError, ValueError, KeyError) as e:
    sys.exit(f"error: {e}")
  wd.write_text(storage.join(args.workdir, "report.md"), text)
  print(storage.join(args.workdir, "report.md"))


if __name__ == "__main__":
  main()
