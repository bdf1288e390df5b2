"""The task registry: what a task gives the round loop (splits, demos, format, extraction)."""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Callable

from tailored_jax.data import answers, synthetic
from tailored_jax.data.formats import AnswerOnlyFormat, QAFormat


@dataclasses.dataclass(frozen=True)
class Example:
  """One question with its gold answer string; `id` is unique within the task. `rationale` is
  the dataset's own human-written solution where it has one (the human-rationale teacher)."""

  id: str
  question: str
  gold: str
  rationale: str = ""


@dataclasses.dataclass(frozen=True)
class Demo:
  question: str
  rationale: str
  answer: str


class Task:
  """A reasoning task. Subclasses set the class fields and implement `load_splits`."""

  name = ""
  default_max_new_tokens = 128
  format = QAFormat()
  all_demos: tuple[Demo, ...] = ()
  extract_answer: Callable[[str], answers.Extraction] = staticmethod(answers.extract_number)
  tfds_name = ""  # the tensorflow-datasets builder holding this task, if any

  def __init__(self, cfg):
    self.cfg = cfg
    if cfg.source != "files" and cfg.source != f"tfds:{self.tfds_name}":
      raise ValueError(
          f"config field task.source: {self.name} reads "
          f"{'files or tfds:' + self.tfds_name if self.tfds_name else 'files only'}"
          f", not {cfg.source!r}"
      )
    if cfg.get("format", "rationale") == "answer_only":
      if not isinstance(self.format, QAFormat):
        raise ValueError(
            f"config field task.format: answer_only is for question-answer tasks; {self.name} "
            "answers with its choices' text"
        )
      self.format = AnswerOnlyFormat()
    self.max_new_tokens = cfg.max_new_tokens or self.default_max_new_tokens
    self.numeric_equality = bool(cfg.numeric_equality)
    self.num_demos = len(self.all_demos) if cfg.num_demos < 0 else cfg.num_demos
    if self.num_demos > len(self.all_demos):
      raise ValueError(
          f"config field task.num_demos: {self.name} has {len(self.all_demos)} "
          f"demos, asked for {self.num_demos}"
      )
    self._splits = None

  def load_splits(self) -> dict[str, list[Example]]:
    raise NotImplementedError

  def splits(self) -> dict[str, list[Example]]:
    """'train', 'val' (held out of train, for model selection) and 'test'; with
    task.max_train / task.max_test, the first N of train / test (a fixed slice)."""
    if self._splits is None:
      self._splits = self.load_splits()
      limits = {"train": self.cfg.get("max_train", 0), "test": self.cfg.get("max_test", 0)}
      for split, limit in limits.items():
        if limit:
          self._splits[split] = self._splits[split][:limit]
    return self._splits

  def demos(self) -> list[Demo]:
    return list(self.all_demos[: self.num_demos])

  def extract(self, output: str) -> answers.Extraction:
    return self.extract_answer(output)

  def format_prefix(self, question: str, demos: list[Demo]) -> str:
    return self.format.prefix(question, demos)

  def format_continuation(self, question: str, rationale: str, answer: str) -> str:
    return self.format.continuation(question, rationale, answer)

  def tokenizer_corpus(self) -> list[Demo]:
    """Worked examples to train a tokenizer on when the config names none."""
    return [Demo(e.question, "", e.gold) for e in self.splits()["train"]]


def hold_out(
    examples: list[Example], num_val: int, seed: int
) -> tuple[list[Example], list[Example]]:
  """A seeded validation slice held out of train: (train, val)."""
  if num_val >= len(examples):
    raise ValueError(f"config field task.num_val: {num_val} >= {len(examples)} train examples")
  order = list(range(len(examples)))
  random.Random(seed).shuffle(order)
  val = set(order[:num_val])
  return (
      [e for i, e in enumerate(examples) if i not in val],
      [e for i, e in enumerate(examples) if i in val],
  )


def question_key(question: str) -> str:
  """A question's text with case and whitespace folded: what makes two records the same question."""
  return " ".join(question.casefold().split())


def unique_questions(examples: list[Example]) -> list[Example]:
  """The first record of each question text; a repeated question would otherwise be counted
  twice and could sit in both train and test (METHOD §5: each question counts once)."""
  seen, unique = set(), []
  for e in examples:
    key = question_key(e.question)
    if key not in seen:
      seen.add(key)
      unique.append(e)
  if len(unique) < len(examples):
    logging.info(
        "%d repeated question texts dropped (first record kept)", len(examples) - len(unique)
    )
  return unique


def split_70_30(examples: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
  """The seeded 70/30 train/test split used where a dataset has no official one."""
  order = list(range(len(examples)))
  random.Random(seed).shuffle(order)
  cut = round(0.7 * len(examples))
  train, test = set(order[:cut]), set(order[cut:])
  return (
      [e for i, e in enumerate(examples) if i in train],
      [e for i, e in enumerate(examples) if i in test],
  )


class SyntheticArithmetic(Task):
  """Multi-step arithmetic word problems from `synthetic.py`, scored like the math tasks."""

  name = "synthetic_arith"
  default_max_new_tokens = 128

  def __init__(self, cfg):
    problems = (
        synthetic.Problem(
            "Mia", "plums", 4, (synthetic.Step("add", 5, 0), synthetic.Step("sub", 2, 1)), "Leo"
        ),
        synthetic.Problem("Tom", "kites", 3, (synthetic.Step("mul", 2, 0),), "Sam"),
        synthetic.Problem(
            "Zoe",
            "beads",
            9,
            (synthetic.Step("sub", 4, 2), synthetic.Step("mul", 3, 1), synthetic.Step("add", 6, 1)),
            "Ray",
        ),
    )
    self.all_demos = tuple(
        Demo(p.question(), synthetic.reference_rationale(p), str(p.answer)) for p in problems
    )
    super().__init__(cfg)
    s = cfg.synthetic
    self.difficulty = synthetic.Difficulty(
        min_steps=s.min_steps,
        max_steps=s.max_steps,
        max_start=s.max_start,
        max_operand=s.max_operand,
        operations=s.operations,
    )
    self.sizes = {"train": s.num_train, "val": s.num_val, "test": s.num_test}
    self.seed = s.seed

  def load_splits(self) -> dict[str, list[Example]]:
    problems = synthetic.generate_splits(self.seed, self.sizes, self.difficulty)
    return {
        split: [
            Example(f"{split}-{i}", p.question(), str(p.answer), synthetic.reference_rationale(p))
            for i, p in enumerate(ps)
        ]
        for split, ps in problems.items()
    }

  def tokenizer_corpus(self) -> list[Demo]:
    problems = synthetic.generate_splits(self.seed, self.sizes, self.difficulty)["train"]
    return [
        Demo(p.question(), synthetic.reference_rationale(p, variant=v), str(p.answer))
        for p in problems
        for v in range(3)
    ]


def registry() -> dict[str, type[Task]]:
  from tailored_jax.data import benchmarks

  tasks = [
      SyntheticArithmetic,
      benchmarks.GSM8K,
      benchmarks.MultiArith,
      benchmarks.SVAMP,
      benchmarks.CommonsenseQA,
      benchmarks.StrategyQA,
  ]
  return {t.name: t for t in tasks}


def build_task(cfg) -> Task:
  """The task named by `cfg.name`, built from the `task` section of the config."""
  tasks = registry()
  if cfg.name not in tasks:
    raise ValueError(f"config field task.name: unknown task {cfg.name!r}; known: {sorted(tasks)}")
  return tasks[cfg.name](cfg)
