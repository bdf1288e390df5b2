"""Seeded multi-step arithmetic word problems: generator, parser and reference rationales.

One template table drives generation, parsing (the local teacher's oracle reads questions back
with it) and rationale writing, so the three can never drift apart.
"""

from __future__ import annotations

import dataclasses
import random
import re

NAMES = ("Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena")
ITEMS = (
    "apples",
    "books",
    "coins",
    "pens",
    "shells",
    "stamps",
    "cards",
    "marbles",
    "eggs",
    "cookies",
)

# Question sentences, per operation. {n}: the person, {x}: operand, {item}: the item, {f}: a friend.
QUESTION_STEPS = {
    "add": (
        "{n} buys {x} more {item}.",
        "{n} finds {x} more {item}.",
        "{f} gives {n} {x} more {item}.",
    ),
    "sub": ("{n} gives {x} {item} to {f}.", "{n} loses {x} {item}.", "{n} sells {x} {item}."),
    "mul": ("{n} doubles the number of {item}.", "{n} triples the number of {item}."),
}
# Rationale sentences, per operation: several wordings, each with the step's equation.
RATIONALE_STEPS = {
    "add": (
        "After getting {x} more, {n} has {p} + {x} = {r} {item}.",
        "{p} + {x} = {r}, so now there are {r} {item}.",
        "Adding the {x} new {item} gives {p} + {x} = {r}.",
    ),
    "sub": (
        "After losing {x}, {n} has {p} - {x} = {r} {item}.",
        "{p} - {x} = {r}, so {r} {item} are left.",
        "Taking away {x} {item} leaves {p} - {x} = {r}.",
    ),
    "mul": (
        "Multiplying by {x} gives {p} * {x} = {r} {item}.",
        "{p} * {x} = {r}, so now there are {r} {item}.",
        "{x} times as many is {p} * {x} = {r}.",
    ),
}
RATIONALE_STARTS = (
    "{n} starts with {a} {item}.",
    "At first {n} has {a} {item}.",
    "{n} begins with {a} {item}.",
)
RATIONALE_ENDS = (
    "So {n} has {r} {item} now.",
    "In the end {n} has {r} {item}.",
    "That leaves {n} with {r} {item}.",
)
QUESTION_START = "{n} has {a} {item}."
QUESTION_END = "How many {item} does {n} have now?"
_MUL_FACTOR = {"doubles": 2, "triples": 3}
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


@dataclasses.dataclass(frozen=True)
class Step:
  op: str  # 'add' | 'sub' | 'mul'
  operand: int
  template: int  # index into QUESTION_STEPS[op]


@dataclasses.dataclass(frozen=True)
class Problem:
  """A parsed or generated problem: who, what, the start amount and the steps."""

  name: str
  item: str
  start: int
  steps: tuple[Step, ...]
  friend: str = ""

  def values(self) -> list[int]:
    """The running amount after each step, starting value first."""
    out = [self.start]
    for step in self.steps:
      out.append(apply(step.op, out[-1], step.operand))
    return out

  @property
  def answer(self) -> int:
    return self.values()[-1]

  def question(self) -> str:
    fields = dict(n=self.name, item=self.item, f=self.friend, a=self.start)
    parts = [QUESTION_START.format(**fields)]
    for step in self.steps:
      parts.append(QUESTION_STEPS[step.op][step.template].format(x=step.operand, **fields))
    parts.append(QUESTION_END.format(**fields))
    return " ".join(parts)


def apply(op: str, value: int, operand: int) -> int:
  if op == "add":
    return value + operand
  if op == "sub":
    return value - operand
  if op == "mul":
    return value * operand
  raise ValueError(f"unknown operation {op!r}")


@dataclasses.dataclass(frozen=True)
class Difficulty:
  """The difficulty knob: how many steps, how large the numbers, which operations."""

  min_steps: int = 1
  max_steps: int = 3
  max_start: int = 20
  max_operand: int = 10
  operations: str = "add,sub,mul"


def generate_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
  ops = [op.strip() for op in difficulty.operations.split(",") if op.strip()]
  name = rng.choice(NAMES)
  friend = rng.choice([n for n in NAMES if n != name])
  item = rng.choice(ITEMS)
  start = rng.randint(1, difficulty.max_start)
  value, steps = start, []
  for _ in range(rng.randint(difficulty.min_steps, difficulty.max_steps)):
    choices = [op for op in ops if not (op == "sub" and value < 1)]
    op = rng.choice(choices)
    template = rng.randrange(len(QUESTION_STEPS[op]))
    if op == "mul":
      operand = 2 + template  # 'doubles' or 'triples'
    elif op == "sub":
      operand = rng.randint(1, min(value, difficulty.max_operand))
    else:
      operand = rng.randint(1, difficulty.max_operand)
    steps.append(Step(op, operand, template))
    value = apply(op, value, operand)
  return Problem(name, item, start, tuple(steps), friend)


def generate_splits(
    seed: int, sizes: dict[str, int], difficulty: Difficulty
) -> dict[str, list[Problem]]:
  """Disjoint splits (no question text in two splits), the same for the same seed and sizes."""
  rng = random.Random(seed)
  seen: set[str] = set()
  splits: dict[str, list[Problem]] = {}
  for split, size in sizes.items():
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < size:
      attempts += 1
      if attempts > 50 * size + 1000:
        raise ValueError(
            f"synthetic task: cannot draw {size} distinct '{split}' problems with "
            f"{difficulty}; raise the difficulty or lower the split size"
        )
      problem = generate_problem(rng, difficulty)
      text = problem.question()
      if text not in seen:
        seen.add(text)
        problems.append(problem)
    splits[split] = problems
  return splits


def reference_rationale(
    problem: Problem, variant: int = 0, rng: random.Random | None = None
) -> str:
  """A correct step-by-step rationale; `rng` picks a wording per sentence, else `variant` does."""

  def pick(options):
    return rng.choice(options) if rng is not None else options[variant % len(options)]

  values = problem.values()
  fields = dict(n=problem.name, item=problem.item)
  parts = [pick(RATIONALE_STARTS).format(a=problem.start, **fields)]
  for step, before, after in zip(problem.steps, values, values[1:]):
    parts.append(pick(RATIONALE_STEPS[step.op]).format(x=step.operand, p=before, r=after, **fields))
  parts.append(pick(RATIONALE_ENDS).format(r=values[-1], **fields))
  return " ".join(parts)


def _template_regex(template: str) -> re.Pattern:
  pattern = re.escape(template)
  for field, group in (
      ("n", r"(?P<n>[A-Z][a-z]+)"),
      ("f", r"(?P<f>[A-Z][a-z]+)"),
      ("x", r"(?P<x>\d+)"),
      ("a", r"(?P<a>\d+)"),
      ("item", r"(?P<item>[a-z]+)"),
  ):
    pattern = pattern.replace(re.escape("{" + field + "}"), group)
  return re.compile(pattern + r"$")


_START_RE = _template_regex(QUESTION_START)
_END_RE = _template_regex(QUESTION_END)
_STEP_RES = [
    (op, i, _template_regex(t)) for op, ts in QUESTION_STEPS.items() for i, t in enumerate(ts)
]
_SENTENCE = re.compile(r"[^.?]+[.?]")


class ParseError(ValueError):
  pass


def parse_question(text: str) -> Problem:
  """Reads a generated question back into its Problem; raises ParseError if it is not one."""
  sentences = [s.strip() for s in _SENTENCE.findall(text.strip())]
  if len(sentences) < 2:
    raise ParseError(f"not a synthetic arithmetic question: {text!r}")
  start = _START_RE.match(sentences[0])
  end = _END_RE.match(sentences[-1])
  if not start or not end:
    raise ParseError(f"not a synthetic arithmetic question: {text!r}")
  name, item = start["n"], start["item"]
  steps, friend = [], ""
  for sentence in sentences[1:-1]:
    for op, template, regex in _STEP_RES:
      match = regex.match(sentence)
      if match:
        groups = match.groupdict()
        friend = groups.get("f") or friend
        operand = int(groups["x"]) if "x" in groups else 2 + template
        steps.append(Step(op, operand, template))
        break
    else:
      raise ParseError(f"unrecognised step sentence {sentence!r} in {text!r}")
  return Problem(name, item, int(start["a"]), tuple(steps), friend)


_EQUATION = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)")


def first_wrong_step(problem: Problem, rationale: str) -> tuple[int, str] | None:
  """The 1-based index and text of the first equation in `rationale` that departs from the
  correct chain (wrong operand, wrong operation or wrong result); None if all match."""
  values = problem.values()
  equations = list(_EQUATION.finditer(rationale))
  for i, (step, before, after) in enumerate(zip(problem.steps, values, values[1:])):
    if i >= len(equations):
      return i + 1, ""
    eq = equations[i]
    got = (int(eq[1]), eq[2], int(eq[3]), int(eq[4]))
    if got != (before, SYMBOL[step.op], step.operand, after):
      return i + 1, eq.group(0)
  return None
