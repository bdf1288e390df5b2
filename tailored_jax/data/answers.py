"""Answer extraction and scoring (METHOD §5): pure functions on model output text."""

from __future__ import annotations

import dataclasses
import re

_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_MARKERS = ("\nAnswer", "Therefore, the answer is")


@dataclasses.dataclass(frozen=True)
class Extraction:
  """What was read from one output: the answer (None if none) and the rationale kept."""

  answer: str | None
  rationale: str
  error: str | None  # why nothing was extracted: 'no_number', ...


def cut_at_blank_line(text: str) -> str:
  return text.split("\n\n", 1)[0]


def extract_number(text: str) -> Extraction:
  """Math rule: first number after `\\nAnswer` or `Therefore, the answer is`, else the last number.

  Commas are removed before matching; the answer is the matched string less a final `.` (the
  sentence's full stop the regex takes along), otherwise as written: `2.50` stays `2.50`. The
  returned rationale is cut right after the number used.
  """
  text = cut_at_blank_line(text)
  for marker in _ANSWER_MARKERS:
    at = text.find(marker)
    if at >= 0:
      head, tail = text[:at], text[at:]
      match = _first_number(tail)
      if match is None:
        return Extraction(None, text, "no_number_after_marker")
      value, end = match
      return Extraction(value, head + tail[:end], None)
  matches = list(_NUMBER.finditer(text.replace(",", "")))
  if not matches:
    return Extraction(None, text, "no_number")
  # Map the match in the comma-free text back to the original text to cut the rationale.
  last = matches[-1]
  return Extraction(
      _without_full_stop(last.group()), _cut_after_nth_comma_free(text, last.end()), None
  )


def _first_number(text: str) -> tuple[str, int] | None:
  stripped = text.replace(",", "")
  match = _NUMBER.search(stripped)
  if match is None:
    return None
  return _without_full_stop(match.group()), _original_index(text, match.end())


def _original_index(text: str, comma_free_index: int) -> int:
  """Index in `text` that corresponds to `comma_free_index` in text.replace(',', '')."""
  seen = 0
  for i, ch in enumerate(text):
    if seen == comma_free_index:
      return i
    if ch != ",":
      seen += 1
  return len(text)


def _cut_after_nth_comma_free(text: str, comma_free_index: int) -> str:
  return text[: _original_index(text, comma_free_index)]


def _without_full_stop(raw: str) -> str:
  return raw[:-1] if raw.endswith(".") else raw


def is_correct(answer: str | None, gold: str, numeric: bool = False) -> bool:
  """Case-insensitive equality with the gold string (METHOD §5); no answer is always wrong.

  `numeric` (config `task.numeric_equality`, off in the paper's setting) also accepts two
  numbers of equal value written differently: `18.00` and `18`.
  """
  if answer is None:
    return False
  if answer.strip().lower() == gold.strip().lower():
    return True
  if numeric:
    try:
      return float(answer) == float(gold)
    except ValueError:
      return False
  return False


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_CHOICE = re.compile(r"\(([a-e])\)", re.IGNORECASE)


def extract_yes_no(text: str) -> Extraction:
  """StrategyQA: as the math rule, with the words yes/no in place of numbers ('Yes,' is yes)."""
  text = cut_at_blank_line(text)
  for marker in _ANSWER_MARKERS:
    at = text.find(marker)
    if at >= 0:
      match = _YES_NO.search(text, at)
      if match is None:
        return Extraction(None, text, "no_yes_no_after_marker")
      return Extraction(match.group(1).capitalize(), text[: match.end()], None)
  matches = list(_YES_NO.finditer(text))
  if not matches:
    return Extraction(None, text, "no_yes_no")
  return Extraction(matches[-1].group(1).capitalize(), text[: matches[-1].end()], None)


def extract_choice(text: str) -> Extraction:
  """CommonsenseQA: the first `(a)`–`(e)` mention on the first line, as a lower-case letter."""
  line = text.lstrip("\n").split("\n", 1)[0]
  match = _CHOICE.search(line)
  if match is None:
    return Extraction(None, line, "no_choice")
  return Extraction(match.group(1).lower(), line[: match.end()], None)
