"""The local teacher's brain for the synthetic task: it solves, rewords and corrects.

It sees only the chat messages (our real prompts) and answers in the requested format. With
`error_rate` > 0 it sometimes slips on one step, so the loop's answer check has work to do.
"""

from __future__ import annotations

import random

from tailored_jax.data import synthetic
from tailored_jax.teacher import prompts


def _slipped_rationale(problem: synthetic.Problem, rng: random.Random) -> tuple[str, int]:
  """A rationale with one arithmetic slip carried through to the end (a wrong final answer)."""
  text = synthetic.reference_rationale(problem, rng=rng)
  values = problem.values()
  wrong = values[-1] + rng.choice([-2, -1, 1, 2])
  return (
      text.replace(f"= {values[-1]}", f"= {wrong}").replace(
          f"has {values[-1]} {problem.item}", f"has {wrong} {problem.item}"
      ),
      wrong,
  )


def _solution(problem: synthetic.Problem, rng: random.Random, error_rate: float) -> tuple[str, int]:
  if problem.steps and rng.random() < error_rate:
    return _slipped_rationale(problem, rng)
  return synthetic.reference_rationale(problem, rng=rng), problem.answer


def reply(messages: list[dict], n: int, rng: random.Random, error_rate: float = 0.0) -> list[str]:
  """`n` completions for one chat request; ValueError if the prompt is not one of ours."""
  request = prompts.parse_request(messages)
  problem = synthetic.parse_question(request.question)
  out = []
  for _ in range(n):
    rationale, answer = _solution(problem, rng, error_rate)
    if request.kind == "annotation":
      out.append(f"Reasoning: {rationale}\nAnswer: {answer}")
      continue
    wrong = synthetic.first_wrong_step(problem, request.student_rationale)
    if wrong is None:
      feedback = "Every step you wrote is right, but the final answer does not follow from them."
    elif wrong[1]:
      step, eq = wrong
      before, after = problem.values()[step - 1 : step + 1]
      op = problem.steps[step - 1]
      feedback = (
          f"Step {step} is wrong: you wrote {eq}, but it should be {before} "
          f"{synthetic.SYMBOL[op.op]} {op.operand} = {after}."
      )
    else:
      feedback = f"You stopped before step {wrong[0]}, so part of the problem was never used."
    out.append(f"Feedback: {feedback}\nReasoning: {rationale}\nAnswer: {answer}")
  return out
