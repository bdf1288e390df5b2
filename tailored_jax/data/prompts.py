"""The training string of METHOD §3/§5: prefix (demos + question) ⊕ continuation (rationale + answer).

The prefix ends at `Reasoning:` and the continuation starts with a space, so a byte-level BPE
keeps its usual `Ġword` tokens at the boundary (the release split after `Reasoning: `).
"""
from __future__ import annotations

from tailored_jax.data.tasks import Demo


def clean_rationale(rationale: str) -> str:
  """Rationale newlines become spaces (METHOD §5); surrounding space is dropped."""
  return " ".join(rationale.replace("\n", " ").split())


def format_prefix(question: str, demos: list[Demo]) -> str:
  shots = "".join(f"Question: {d.question}\nReasoning: {clean_rationale(d.rationale)}\n"
                  f"Answer: {d.answer}\n\n" for d in demos)
  return f"{shots}Question: {question.strip()}\nReasoning:"


def format_continuation(rationale: str, answer: str) -> str:
  return f" {clean_rationale(rationale)}\nAnswer: {answer}"
