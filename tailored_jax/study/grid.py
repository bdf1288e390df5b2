"""`--grid=paper`: the paper's comparison as arms of one base config, each an override set on
it: prompting (round 0 of every arm: the initial student, `eval.initial`), answer-only
fine-tuning, plain distillation, + tailored feedback rounds, + self-reflection (the full method),
STaR. Plain distillation gets the teacher tokens the full method spent (more rationales per
question at annotation, `matched_rationales`), so the two compare at an equal budget; the
answer-only and STaR arms use no teacher.
"""

from __future__ import annotations

import math
import os

from tailored_jax import workdir as wd
from tailored_jax.layout import Layout
from tailored_jax.study.runs import Run

ALL = ["--config.eval.initial=True"]
# (arm, overrides on the base config); the full method is the base as it is
TEACHER_ARMS = (
    ("tailored_reflection", ()),
    ("tailored_rounds", ("--config.method.self_reflection=False",)),
)
NO_TEACHER_ARMS = (
    (
        "answer_only",
        (
            "--config.task.format=answer_only",
            "--config.method.feedback=False",
            "--config.method.self_reflection=False",
            "--config.rounds=1",
        ),
    ),
    ("star", ("--config.teacher.kind=self", "--config.method.self_reflection=False")),
)
PLAIN = (
    "plain_distillation",
    (
        "--config.rounds=1",
        "--config.method.feedback=False",
        "--config.method.self_reflection=False",
    ),
)


def arms(config_path: str, seeds: int, study_dir: str, base_seed: int, stage: int) -> list[Run]:
  """Stage 1: the arms whose budget is their own; stage 2 adds plain distillation (its
  rationales per question set once stage 1's spending is known: `plain_arm`)."""
  chosen = [*TEACHER_ARMS, *NO_TEACHER_ARMS] if stage == 1 else []
  return [
      Run(
          config_path,
          base_seed + k,
          os.path.join(study_dir, name, f"seed_{base_seed + k}"),
          name,
          (*ALL, *overrides),
      )
      for name, overrides in chosen
      for k in range(seeds)
  ]


def teacher_tokens(run: Run) -> tuple[int, int, int]:
  """(all teacher tokens the run paid, its annotation's tokens, annotation requests x n)."""
  layout = Layout(run.workdir)
  total, annotate, rationales = 0, 0, 0
  r = 1
  while os.path.exists(layout.teacher_report(r)):
    report = wd.read_json(layout.teacher_report(r))
    usage = report.get("usage") or {}
    tokens = usage.get("tokens", 0) + usage.get("cached_tokens", 0)
    total += tokens
    if r == 1:
      annotate = tokens
      rationales = report.get("questions", 0)
    r += 1
  return total, annotate, rationales


def matched_rationales(full_tokens: float, annotate_tokens: float, questions: int, n: int) -> int:
  """Rationales per question that spend `full_tokens` at annotation, given that asking `n` per
  question for `questions` questions spent `annotate_tokens` (prompt tokens are paid once per
  request and completion tokens per rationale; the estimate takes the whole per-question cost
  as proportional to n, an upper bound that keeps plain distillation within the budget)."""
  if annotate_tokens <= 0 or questions <= 0:
    raise ValueError("the full method's annotation spent nothing: no budget to match")
  per_rationale = annotate_tokens / (questions * n)
  return max(n, math.floor(full_tokens / (questions * per_rationale)))


def plain_arm(
    config_path: str, seeds: int, study_dir: str, base_seed: int, full_runs: list[Run], n: int
) -> tuple[list[Run], int]:
  """Plain distillation at the full method's mean teacher tokens over its seeds."""
  spent = [teacher_tokens(run) for run in full_runs]
  full = sum(s[0] for s in spent) / len(spent)
  annotate = sum(s[1] for s in spent) / len(spent)
  questions = spent[0][2]
  k = matched_rationales(full, annotate, questions, n)
  name, overrides = PLAIN
  overrides = (*ALL, *overrides, f"--config.teacher.num_rationales={k}")
  runs = [
      Run(
          config_path,
          base_seed + s,
          os.path.join(study_dir, name, f"seed_{base_seed + s}"),
          name,
          overrides,
      )
      for s in range(seeds)
  ]
  return runs, k
