"""The human-rationale teacher: it answers with a task's own written solutions (GSM8K's, cleaned
of calculator notes; the synthetic task's reference ones), so a real task runs end to end with
no API: the "distil from human rationales" baseline. Served by the local teacher server."""

from __future__ import annotations

import random

from tailored_jax.data.tasks import Example
from tailored_jax.teacher import prompts


def _normal(text: str) -> str:
  return " ".join(text.split())


class DatasetAnswers:
  """`(messages, n, rng) -> n texts` for `OracleApp(answer=...)`: the question's human
  rationale and gold answer, n times (use teacher.num_rationales=1); feedback requests get the
  same solution. A question without a human rationale is a ValueError (HTTP 400)."""

  def __init__(self, examples: list[Example], source: str):
    self.by_question = {_normal(e.question): e for e in examples if e.rationale}
    if not self.by_question:
      raise ValueError(
          f"{source} has no human rationales: teacher.kind=dataset needs a task "
          "whose records carry solutions (gsm8k, synthetic)"
      )

  def __call__(self, messages: list[dict], n: int, rng: random.Random) -> list[str]:
    del rng
    request = prompts.parse_request(messages)
    example = self.by_question.get(_normal(request.question))
    if example is None:
      raise ValueError(f"no human rationale for the question {request.question[:80]!r}")
    text = f"Reasoning: {example.rationale}\nAnswer: {example.gold}"
    if request.kind == "feedback":
      text = "Feedback: compare your steps with the reference solution.\n" + text
    return [text] * n
