"""Training-string formats (METHOD §3/§5): prefix (demos + question) ⊕ continuation.

Prefixes end at `Reasoning:` (or `Answer:` for multiple choice) and continuations start with a
space, so a byte-level BPE keeps its usual `Ġword` tokens at the boundary (the release split
after `Reasoning: `).
"""

from __future__ import annotations

import dataclasses
import re

_CHOICE_LINE = re.compile(r"^\(([a-e])\) (.*)$", re.MULTILINE)


def clean_rationale(rationale: str) -> str:
  """Rationale newlines become spaces (METHOD §5); surrounding space is dropped."""
  return " ".join(rationale.replace("\n", " ").split())


@dataclasses.dataclass(frozen=True)
class QAFormat:
  """`Question: q\\nReasoning: r\\nAnswer: a` (math tasks and StrategyQA)."""

  style_hint: str = (
      "one short sentence per step, every calculation written as an equation like 12 + 7 = 19"
  )
  answer_hint: str = "the final answer only"

  def prefix(self, question: str, demos) -> str:
    shots = "".join(
        f"Question: {d.question}\nReasoning: {clean_rationale(d.rationale)}\n"
        f"Answer: {d.answer}\n\n"
        for d in demos
    )
    return f"{shots}Question: {question.strip()}\nReasoning:"

  def continuation(self, question: str, rationale: str, answer: str) -> str:
    del question
    return f" {clean_rationale(rationale)}\nAnswer: {answer}"


@dataclasses.dataclass(frozen=True)
class ChoiceFormat:
  """CommonsenseQA: the question carries an `Answer Choices:` block; the rationale is the answer
  line and ends with `Therefore, the answer is {text} ({letter}).`"""

  style_hint: str = (
      "a few short sentences on which choice fits and why, ending with "
      "'Therefore, the answer is <choice text> (<letter>).'"
  )
  answer_hint: str = "the letter of the choice, like (b)"

  def prefix(self, question: str, demos) -> str:
    shots = "".join(
        f"Question: {d.question}\nAnswer: {clean_rationale(d.rationale)}\n\n" for d in demos
    )
    return f"{shots}Question: {question.strip()}\nAnswer:"

  def continuation(self, question: str, rationale: str, answer: str) -> str:
    rationale = clean_rationale(rationale)
    letter = answer.strip().strip("()").lower()
    if "Therefore, the answer is" not in rationale:
      text = dict(_CHOICE_LINE.findall(question)).get(letter, "")
      rationale = f"{rationale} Therefore, the answer is {text} ({letter}).".replace("  ", " ")
    return f" {rationale}"


@dataclasses.dataclass(frozen=True)
class AnswerOnlyFormat:
  """`Question: q\nAnswer: a`, no rationale: the answer-only fine-tuning baseline
  (`task.format=answer_only`); demos lose their rationales too."""

  style_hint: str = ""
  answer_hint: str = "the final answer only"

  def prefix(self, question: str, demos) -> str:
    shots = "".join(f"Question: {d.question}\nAnswer: {d.answer}\n\n" for d in demos)
    return f"{shots}Question: {question.strip()}\nAnswer:"

  def continuation(self, question: str, rationale: str, answer: str) -> str:
    del question, rationale
    return f" {answer}"


def choices_block(stem: str, choices: list[str]) -> str:
  letters = "abcde"
  lines = "\n".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))
  return f"{stem.strip()}\nAnswer Choices:\n{lines}"
