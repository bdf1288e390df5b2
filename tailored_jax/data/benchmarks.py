"""The paper's five tasks (METHOD §6) read from their original files (see shared/data/README.md).

`task.data_path` is the folder holding a task's files under their original names. Splits: the
official ones where they exist; a seeded 70/30 split (`task.split_seed`) where they don't; the
validation slice (`task.num_val`) is always held out of train, never of test.
"""

from __future__ import annotations

import os
import re

from tailored_jax.data import answers
from tailored_jax.data.formats import ChoiceFormat, QAFormat, choices_block
from tailored_jax.data.sources import (DataError, field, iter_tfds_records, load, load_records)
from tailored_jax.data.tasks import (Demo, Example, Task, hold_out, split_70_30, unique_questions)

MATH_DEMOS = (
    Demo(
        "A baker makes 24 muffins in the morning and 18 more in the afternoon. She sells 30 of "
        "them. How many muffins are left?",
        "The baker makes 24 + 18 = 42 muffins. After selling 30, 42 - 30 = 12 muffins are left.",
        "12",
    ),
    Demo(
        "Liam reads 15 pages every day for 6 days, then reads 20 pages on the seventh day. How "
        "many pages does he read that week?",
        "In the first 6 days he reads 15 * 6 = 90 pages. With the seventh day that is "
        "90 + 20 = 110 pages.",
        "110",
    ),
    Demo(
        "A box holds 8 crayons. A teacher has 5 full boxes and gives 12 crayons away. She "
        "shares the rest equally among 4 tables. How many crayons does each table get?",
        "The teacher has 5 * 8 = 40 crayons. After giving 12 away she has 40 - 12 = 28. Each "
        "of the 4 tables gets 28 / 4 = 7 crayons.",
        "7",
    ),
)

STRATEGY_DEMOS = (
    Demo(
        "Could a penguin walk from Antarctica to Australia?",
        "Antarctica and Australia are separated by the Southern Ocean, thousands of kilometres "
        "of open water. Nobody can walk across an ocean. So the walk is impossible.",
        "No",
    ),
    Demo(
        "Is a teaspoon of honey heavier than a teaspoon of water?",
        "Honey is denser than water, about 1.4 grams per millilitre. The same volume of a "
        "denser liquid weighs more. So the honey is heavier.",
        "Yes",
    ),
    Demo(
        "Could a person born in 1990 vote in the 2004 United States presidential election?",
        "In 2004 a person born in 1990 was at most 14. Voting in US federal elections needs an "
        "age of at least 18. So they could not vote.",
        "No",
    ),
    Demo(
        "Can a standard piano play a note lower than the lowest string of a guitar?",
        "A guitar's lowest open string is E2, about 82 Hz. A standard piano reaches down to A0, "
        "about 27.5 Hz. So the piano goes lower.",
        "Yes",
    ),
)

CSQA_DEMOS = tuple(
    Demo(choices_block(stem, choices), rationale, letter)
    for stem, choices, rationale, letter in (
        (
            "Where would you keep milk so that it stays cold?",
            ["cupboard", "refrigerator", "oven", "backpack", "windowsill"],
            "Milk needs a cold place to stay fresh, and a refrigerator is built to keep food cold. "
            "Therefore, the answer is refrigerator (b).",
            "b",
        ),
        (
            "What do people usually do when they feel tired at night?",
            ["run", "cook", "sleep", "shout", "swim"],
            "Tiredness at night is the body asking for rest. Therefore, the answer is sleep (c).",
            "c",
        ),
        (
            "What tool would a carpenter use to drive a nail into wood?",
            ["hammer", "spoon", "brush", "ruler", "pillow"],
            "A nail goes in when it is struck hard, which is what a hammer is for. Therefore, the "
            "answer is hammer (a).",
            "a",
        ),
        (
            "If you want to see many kinds of wild animals in one place in a city, where would you "
            "go?",
            ["library", "bank", "stadium", "office", "zoo"],
            "A zoo keeps many kinds of wild animals where visitors can see them. Therefore, the "
            "answer is zoo (e).",
            "e",
        ),
        (
            "What usually happens to a houseplant that nobody waters for weeks?",
            ["it grows faster", "it sings", "it becomes taller", "it wilts", "it freezes"],
            "A plant without water loses the pressure that holds its leaves up, so they droop and "
            "dry out. Therefore, the answer is it wilts (d).",
            "d",
        ),
    )
)


def _path(cfg, name: str) -> str:
  if not cfg.data_path:
    raise DataError(f"config field task.data_path: set it to the folder with the {name} file")
  return os.path.join(cfg.data_path, name)


def _integral(value, where: str, name: str) -> str:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value != int(value):
    raise DataError(f"{where}: field '{name}' is not an integral number: {value!r}")
  return str(int(value))


class _MathTask(Task):
  format = QAFormat()
  all_demos = MATH_DEMOS
  default_max_new_tokens = 192

  def _split_with_val(self, train: list[Example], test: list[Example]) -> dict:
    train, val = hold_out(train, self.cfg.num_val, self.cfg.split_seed)
    return {"train": train, "val": val, "test": test}


def human_rationale(solution: str) -> str:
  """A GSM8K solution as a rationale: calculator notes (`<<48/2=24>>`) and the `#### answer` line
  removed, lines joined."""
  body = solution.rsplit("#### ", 1)[0]
  return " ".join(re.sub(r"<<[^>]*>>", "", body).split())


class GSM8K(_MathTask):
  name = "gsm8k"
  tfds_name = "gsm8k"
  default_max_new_tokens = 256

  @staticmethod
  def parse(split: str):

    def parse_record(record, where):
      solution = field(record, "answer", where)
      if "#### " not in solution:
        raise DataError(f"{where}: field 'answer' has no '#### <final>' line")
      gold = solution.rsplit("#### ", 1)[1].strip().replace(",", "")
      number = re.search(r"(\d+)\]?$", where).group(1)  # file line or TFDS index
      return Example(
          f"{split}-{number}",
          field(record, "question", where).strip(),
          gold,
          human_rationale(solution),
      )

    return parse_record

  def load_splits(self):
    skip = self.cfg.skip_malformed
    if self.cfg.source.startswith("tfds:"):
      name = self.cfg.source[len("tfds:") :]
      train, test = (
          load_records(
              iter_tfds_records(name, split, self.cfg.data_path),
              self.parse(split),
              skip,
              f"tfds:{name}/{split}",
          )
          for split in ("train", "test")
      )
    else:
      train = load(_path(self.cfg, "train.jsonl"), self.parse("train"), skip)
      test = load(_path(self.cfg, "test.jsonl"), self.parse("test"), skip)
    return self._split_with_val(train, test)


class MultiArith(_MathTask):
  name = "multiarith"

  @staticmethod
  def parse_record(record, where):
    solutions = field(record, "lSolutions", where, list)
    if not solutions:
      raise DataError(f"{where}: field 'lSolutions' is empty")
    return Example(
        f"multiarith-{field(record, 'iIndex', where, int)}",
        " ".join(field(record, "sQuestion", where).split()),
        _integral(solutions[0], where, "lSolutions"),
    )

  def load_splits(self):
    examples = load(_path(self.cfg, "MultiArith.json"), self.parse_record, self.cfg.skip_malformed)
    # 20 question texts appear twice in the file (same gold): kept once, before splitting.
    return self._split_with_val(*split_70_30(unique_questions(examples), self.cfg.split_seed))


class SVAMP(_MathTask):
  name = "svamp"

  @staticmethod
  def parse_record(record, where):
    body = " ".join(field(record, "Body", where).split())
    if body and not body.endswith("."):
      body += "."
    question = " ".join(field(record, "Question", where).split())
    return Example(
        field(record, "ID", where),
        f"{body} {question}".strip(),
        _integral(field(record, "Answer", where, (int, float)), where, "Answer"),
    )

  def load_splits(self):
    examples = load(_path(self.cfg, "SVAMP.json"), self.parse_record, self.cfg.skip_malformed)
    return self._split_with_val(*split_70_30(unique_questions(examples), self.cfg.split_seed))


class StrategyQA(Task):
  name = "strategyqa"
  format = QAFormat(
      style_hint="a few short factual sentences that lead to yes or no", answer_hint="Yes or No"
  )
  all_demos = STRATEGY_DEMOS
  default_max_new_tokens = 128
  extract_answer = staticmethod(answers.extract_yes_no)

  @staticmethod
  def parse_record(record, where):
    answer = field(record, "answer", where, bool)
    return Example(
        field(record, "qid", where),
        " ".join(field(record, "question", where).split()),
        "Yes" if answer else "No",
    )

  def load_splits(self):
    examples = []
    for name in ("train.json", "dev.json"):
      examples += load(_path(self.cfg, name), self.parse_record, self.cfg.skip_malformed)
    # One question text appears in two records: keep it once so it cannot sit in train and test.
    train, test = split_70_30(unique_questions(examples), self.cfg.split_seed)
    train, val = hold_out(train, self.cfg.num_val, self.cfg.split_seed)
    return {"train": train, "val": val, "test": test}


class CommonsenseQA(Task):
  """Evaluated on the official dev split (the official test has no labels)."""

  name = "csqa"
  format = ChoiceFormat()
  all_demos = CSQA_DEMOS
  default_max_new_tokens = 96
  extract_answer = staticmethod(answers.extract_choice)

  @staticmethod
  def parse_record(record, where):
    question = field(record, "question", where, dict)
    choices = field(question, "choices", f"{where} question", list)
    labels = [field(c, "label", f"{where} question.choices", str) for c in choices]
    if labels != list("ABCDE"):
      raise DataError(f"{where}: field 'question.choices' labels are {labels}, not A-E")
    key = field(record, "answerKey", where)
    if key not in "ABCDE" or len(key) != 1:
      raise DataError(f"{where}: field 'answerKey' is {key!r}, not one of A-E")
    texts = [field(c, "text", f"{where} question.choices", str) for c in choices]
    return Example(
        field(record, "id", where),
        choices_block(field(question, "stem", f"{where} question"), texts),
        key.lower(),
    )

  def load_splits(self):
    skip = self.cfg.skip_malformed
    train = load(_path(self.cfg, "train_rand_split.jsonl"), self.parse_record, skip)
    test = load(_path(self.cfg, "dev_rand_split.jsonl"), self.parse_record, skip)
    train, val = hold_out(train, self.cfg.num_val, self.cfg.split_seed)
    return {"train": train, "val": val, "test": test}
