"""The task registry: what a task gives the round loop (splits, demos, extraction, limits)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

from tailored_jax.data import answers, synthetic


@dataclasses.dataclass(frozen=True)
class Example:
  """One question with its gold answer string; `id` is unique within the task."""
  id: str
  question: str
  gold: str


@dataclasses.dataclass(frozen=True)
class Demo:
  question: str
  rationale: str
  answer: str


class Task(Protocol):
  name: str
  max_new_tokens: int

  def splits(self) -> dict[str, list[Example]]:
    """'train', 'val' (held out of train, for model selection) and 'test'."""

  def demos(self) -> list[Demo]:
    ...

  def extract(self, output: str) -> answers.Extraction:
    ...

  def tokenizer_corpus(self) -> list[Demo]:
    """Worked examples to train a tokenizer on when the config names none."""


class SyntheticArithmetic:
  """Multi-step arithmetic word problems from `synthetic.py`, scored like the math tasks."""
  name = "synthetic_arith"

  def __init__(self, cfg):
    self.max_new_tokens = cfg.max_new_tokens
    self.num_demos = cfg.num_demos
    self.difficulty = synthetic.Difficulty(
        min_steps=cfg.synthetic.min_steps, max_steps=cfg.synthetic.max_steps,
        max_start=cfg.synthetic.max_start, max_operand=cfg.synthetic.max_operand,
        operations=cfg.synthetic.operations)
    self.sizes = {"train": cfg.synthetic.num_train, "val": cfg.synthetic.num_val,
                  "test": cfg.synthetic.num_test}
    self.seed = cfg.synthetic.seed
    self._splits = None

  def splits(self) -> dict[str, list[Example]]:
    if self._splits is None:
      problems = synthetic.generate_splits(self.seed, self.sizes, self.difficulty)
      self._splits = {
          split: [Example(f"{split}-{i}", p.question(), str(p.answer)) for i, p in enumerate(ps)]
          for split, ps in problems.items()}
    return self._splits

  def demos(self) -> list[Demo]:
    out = []
    for problem in _SYNTHETIC_DEMOS[:self.num_demos]:
      out.append(Demo(problem.question(), synthetic.reference_rationale(problem),
                      str(problem.answer)))
    return out

  def extract(self, output: str) -> answers.Extraction:
    return answers.extract_number(output)

  def tokenizer_corpus(self) -> list[Demo]:
    problems = synthetic.generate_splits(self.seed, self.sizes, self.difficulty)["train"]
    return [Demo(p.question(), synthetic.reference_rationale(p, variant=v), str(p.answer))
            for p in problems for v in range(3)]


_SYNTHETIC_DEMOS = (
    synthetic.Problem("Mia", "plums", 4, (synthetic.Step("add", 5, 0),
                                          synthetic.Step("sub", 2, 1)), "Leo"),
    synthetic.Problem("Tom", "kites", 3, (synthetic.Step("mul", 2, 0),), "Sam"),
    synthetic.Problem("Zoe", "beads", 9, (synthetic.Step("sub", 4, 2), synthetic.Step("mul", 3, 1),
                                          synthetic.Step("add", 6, 1)), "Ray"),
)

TASKS: dict[str, Callable[..., Task]] = {SyntheticArithmetic.name: SyntheticArithmetic}


def build_task(cfg) -> Task:
  """The task named by `cfg.name`, built from the `task` section of the config."""
  if cfg.name not in TASKS:
    raise ValueError(f"config field task.name: unknown task {cfg.name!r}; "
                     f"known: {sorted(TASKS)}")
  return TASKS[cfg.name](cfg)
