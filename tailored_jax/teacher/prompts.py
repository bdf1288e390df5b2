"""The teacher prompts (annotation and tailored feedback), versioned, and how replies are read.

PROMPT_VERSION is stored beside every cached reply: change it whenever the wording changes.
The local oracle reads requests back with the `parse_*_request` functions here, so the prompt
format and its reader live in one place.
"""

from __future__ import annotations

import dataclasses
import re

from tailored_jax.data.formats import QAFormat, clean_rationale
from tailored_jax.data.tasks import Demo

PROMPT_VERSION = "tailored-1"

SYSTEM = (
    "You are a patient, exact teacher. You solve reasoning problems step by step and "
    "explain a student's mistakes plainly."
)
_FORMAT = (
    "Reply in exactly this format:\n{feedback}Reasoning: <the step-by-step reasoning, "
    "{style}>\nAnswer: <{answer}>"
)
_PROBLEM = "Problem: "
_STUDENT = "Student's reasoning: "
_GOLD = "Correct final answer: "


def _examples(demos: list[Demo]) -> str:
  if not demos:
    return ""
  shots = "\n\n".join(
      f"{_PROBLEM}{d.question}\nReasoning: {clean_rationale(d.rationale)}\nAnswer: {d.answer}"
      for d in demos
  )
  return f"Examples of the expected style:\n\n{shots}\n\n"


def _reply_format(style, feedback: str) -> str:
  return _FORMAT.format(feedback=feedback, style=style.style_hint, answer=style.answer_hint)


def annotation_messages(question: str, demos: list[Demo], style=QAFormat()) -> list[dict]:
  """Ask for a step-by-step solution; `style` (the task's format) says how rationales read."""
  user = (
      f"{_examples(demos)}Solve the problem below.\n{_reply_format(style, '')}\n\n"
      f"{_PROBLEM}{question.strip()}"
  )
  return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def feedback_messages(
    question: str, student_rationale: str, gold: str, demos: list[Demo], style=QAFormat()
) -> list[dict]:
  """Show a mistake and the gold answer; ask where it went wrong and for a correct solution."""
  user = (
      f"{_examples(demos)}A student tried the problem below and got it wrong.\n"
      "First say in one sentence where the student's reasoning first goes wrong. Then write "
      "a complete, correct solution in the style of the examples.\n"
      f"{_reply_format(style, 'Feedback: <where the student first went wrong>' + chr(10))}"
      f"\n\n{_PROBLEM}{question.strip()}\n{_STUDENT}{clean_rationale(student_rationale)}\n"
      f"{_GOLD}{gold.strip()}"
  )
  return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
  kind: str  # 'annotation' | 'feedback'
  question: str
  student_rationale: str = ""
  gold: str = ""


def parse_request(messages: list[dict]) -> ParsedRequest:
  """Reads one of our prompts back (the oracle's view); ValueError if it is not one."""
  user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
  tail = user.rsplit("\n\n", 1)[-1]
  fields = {}
  for line in tail.split("\n"):
    for marker, name in ((_PROBLEM, "question"), (_STUDENT, "student"), (_GOLD, "gold")):
      if line.startswith(marker):
        fields[name] = line[len(marker) :]
  if "question" not in fields:
    raise ValueError("not a tailored_jax teacher prompt: no 'Problem:' line at the end")
  if "student" in fields or "gold" in fields:
    if not ("student" in fields and "gold" in fields):
      raise ValueError("feedback prompt without both the student's reasoning and the answer")
    return ParsedRequest("feedback", fields["question"], fields["student"], fields["gold"])
  return ParsedRequest("annotation", fields["question"])


_REASONING = re.compile(r"Reasoning:\s*(.*?)(?:\n\s*Answer:|\Z)", re.S)
_ANSWER = re.compile(r"\n\s*Answer:\s*(.*)")

_FEEDBACK = re.compile(r"Feedback:\s*(.*?)(?:\n\s*Reasoning:|\Z)", re.S)


@dataclasses.dataclass(frozen=True)
class ParsedReply:
  rationale: str
  answer: str | None  # the text after `Answer:`; None if the reply has no such line
  feedback: str = ""  # the text after `Feedback:` (feedback replies), else empty


def parse_reply(text: str) -> ParsedReply:
  """Rationale and stated answer from a reply in our format; unformatted replies keep all text."""
  match = _REASONING.search(text)
  rationale = match.group(1) if match else text
  answer = _ANSWER.search("\n" + text[match.end(1) :] if match else "\n" + text)
  answer_text = answer.group(1).strip().split("\n")[0].strip() if answer else None
  feedback = _FEEDBACK.search(text[: match.start()] if match else text)
  return ParsedReply(
      clean_rationale(rationale),
      answer_text or None,
      clean_rationale(feedback.group(1)) if feedback else "",
  )
