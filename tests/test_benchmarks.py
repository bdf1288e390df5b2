"""The five paper tasks on their original files (skipped when ../shared/data is absent)."""

import json
import os
import re

import pytest

from tailored_jax import config_lib, score
from tailored_jax.data import answers, scoring
from tailored_jax.data.sources import DataError
from tailored_jax.data.tasks import build_task
from tests.shared_data import DATA

needs_data = pytest.mark.skipif(
    not os.path.isdir(DATA), reason=f"benchmark files not found at {DATA}"
)


def task(name, **overrides):
  cfg = config_lib.base_config().task
  cfg.name = name
  cfg.data_path = os.path.join(DATA, {"synthetic_arith": ""}.get(name, name))
  cfg.update(overrides)
  return build_task(cfg)


def sizes(t):
  return {k: len(v) for k, v in t.splits().items()}


@needs_data
@pytest.mark.parametrize(
    "name, expected",
    [
        ("gsm8k", {"train": 7373, "val": 100, "test": 1319}),
        ("multiarith", {"train": 306, "val": 100, "test": 174}),  # 600 records, 580 questions
        ("svamp", {"train": 600, "val": 100, "test": 300}),
        ("csqa", {"train": 9641, "val": 100, "test": 1221}),
    ],
)
def test_record_counts_and_splits(name, expected):
  t = task(name)
  assert sizes(t) == expected
  splits = t.splits()
  ids = [e.id for s in splits.values() for e in s]
  assert len(set(ids)) == len(ids)
  assert sizes(task(name)) == expected and task(name).splits() == splits  # deterministic


@needs_data
@pytest.mark.parametrize("name", ["gsm8k", "multiarith", "svamp", "csqa", "strategyqa"])
def test_every_question_text_sits_in_one_split_once(name):
  from tailored_jax.data.tasks import question_key

  keys = [question_key(e.question) for s in task(name).splits().values() for e in s]
  assert len(set(keys)) == len(keys)


def test_accuracy_counts_each_question_once():
  from tailored_jax.data.tasks import Example

  t = task("synthetic_arith")
  example = Example("q1", "How many?", "3")
  with pytest.raises(ValueError, match="repeated ids: \\['q1'\\]"):
    scoring.score(t, [example, example], ["Answer: 3", "Answer: 4"])


@needs_data
def test_strategyqa_merges_files_and_keeps_a_duplicated_question_once():
  t = task("strategyqa")
  all_examples = [e for s in t.splits().values() for e in s]
  assert len(all_examples) == 2289  # 2061 + 229 records, one question text shared by two
  questions = [e.question for e in all_examples]
  assert len(set(questions)) == len(questions)
  assert all(q == q.strip() for q in questions)
  assert {e.gold for e in all_examples} == {"Yes", "No"}
  assert round(0.3 * 2289) == len(t.splits()["test"])


@needs_data
def test_gsm8k_gold_solutions_score_100_percent():
  t = task("gsm8k")
  for split in ("train", "val", "test"):
    examples = t.splits()[split]
    outputs = []
    with open(os.path.join(DATA, "gsm8k", "train.jsonl" if split != "test" else "test.jsonl")) as f:
      solutions = {json.loads(line)["question"].strip(): json.loads(line)["answer"] for line in f}
    for e in examples:
      worked, final = solutions[e.question].rsplit("#### ", 1)
      rationale = re.sub(r"<<[^>]*>>", "", worked)
      outputs.append(t.format_continuation(e.question, rationale, final.strip()))
    _, summary = scoring.score(t, examples, outputs)
    assert summary["accuracy"] == 1.0, (split, summary)


@needs_data
def test_gsm8k_commas_and_negatives():
  t = task("gsm8k")
  with open(os.path.join(DATA, "gsm8k", "train.jsonl")) as f:
    finals = [json.loads(line)["answer"].rsplit("#### ", 1)[1].strip() for line in f]
  with_commas = [x for x in finals if "," in x]
  assert len(with_commas) == 79
  golds = {e.gold for s in t.splits().values() for e in s}
  assert "2125" in golds and "2,125" not in golds
  assert any(g.startswith("-") for g in golds)
  assert answers.is_correct(answers.extract_number(" It costs 2,125 dollars.").answer, "2125")


@needs_data
def test_svamp_and_multiarith_golds_are_integers_and_questions_joined():
  svamp = task("svamp")
  example = next(e for s in svamp.splits().values() for e in s if e.id == "chal-1")
  assert example.question == (
      "Each pack of dvds costs 76 dollars. If there is a discount of 25 "
      "dollars on each pack. How much do you have to pay to buy each pack?"
  )
  assert example.gold == "51"
  for t in (svamp, task("multiarith")):
    assert all(re.fullmatch(r"-?\d+", e.gold) for s in t.splits().values() for e in s)


@needs_data
def test_csqa_format_and_unlabeled_test_file():
  t = task("csqa")
  example = next(e for e in t.splits()["test"] if e.id == "1afa02df02c908a558b4036e80242fac")
  assert example.gold == "a"
  assert example.question.endswith(
      "Answer Choices:\n(a) bank\n(b) library\n(c) department store\n(d) mall\n(e) new york"
  )
  prefix = t.format_prefix(example.question, t.all_demos[:1])
  assert prefix.endswith("(e) new york\nAnswer:") and prefix.count("Question:") == 2
  continuation = t.format_continuation(example.question, "Banks guard money.", "(a)")
  assert continuation == " Banks guard money. Therefore, the answer is bank (a)."
  assert answers.is_correct(t.extract(continuation).answer, example.gold)
  bad = os.path.join(DATA, "csqa", "test_rand_split_no_answers.jsonl")
  from tailored_jax.data.sources import load

  with pytest.raises(
      DataError, match=r"test_rand_split_no_answers.jsonl:1: missing field " r"'answerKey'"
  ):
    load(bad, t.parse_record)


def test_malformed_records_name_file_line_and_field(tmp_path):
  (tmp_path / "train.jsonl").write_text(
      '{"question": "q", "answer": "x\\n#### 4"}\n'
      '{"question": "q2", "answer": "no final"}\n'
      '{"question": "q4", "answer": "#### -3"}\n'
  )
  (tmp_path / "test.jsonl").write_text('{"question": "q3", "answer": "#### 1"}\n')
  t = task("gsm8k", data_path=str(tmp_path), num_val=1)
  with pytest.raises(DataError, match=r"train.jsonl:2: field 'answer' has no '#### <final>'"):
    t.splits()
  t = task("gsm8k", data_path=str(tmp_path), num_val=1, skip_malformed=True)
  assert sizes(t) == {"train": 1, "val": 1, "test": 1}
  (tmp_path / "SVAMP.json").write_text(
      '[{"ID": "a", "Body": "b", "Question": "q", ' '"Answer": "5"}]'
  )
  with pytest.raises(DataError, match=r"SVAMP.json\[0\]: field 'Answer' has type str"):
    task("svamp", data_path=str(tmp_path)).splits()


def test_num_demos_per_task():
  counts = {
      name: len(task(name, num_demos=-1).demos())
      for name in ("gsm8k", "svamp", "multiarith", "strategyqa", "csqa")
  }
  assert counts == {"gsm8k": 3, "svamp": 3, "multiarith": 3, "strategyqa": 4, "csqa": 5}
  limits = {
      name: task(name).max_new_tokens
      for name in ("gsm8k", "svamp", "multiarith", "csqa", "strategyqa")
  }
  assert limits == {"gsm8k": 256, "svamp": 192, "multiarith": 192, "csqa": 96, "strategyqa": 128}


def test_score_cli_matches_by_id_and_question(tmp_path, capsys):
  t = task("synthetic_arith")
  test = t.splits()["test"][:3]
  lines = [
      {"id": test[0].id, "output": f" ...\nAnswer: {test[0].gold}"},
      {"question": test[1].question, "output": " I do not know."},
      {"id": test[2].id, "output": f" so {int(test[2].gold) + 1}"},
  ]
  path = tmp_path / "pred.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  assert score.main(["--task=synthetic_arith", f"--predictions={path}"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert (result["correct"], result["total"]) == (1, 3)
  assert result["errors"] == {"no_number": 1, "wrong_answer": 1}
  path.write_text('{"id": "nope", "output": "1"}\n')
  assert score.main(["--task=synthetic_arith", f"--predictions={path}"]) == 2
  assert "pred.jsonl:1: id 'nope' is not in synthetic_arith test" in capsys.readouterr().err


def test_gsm8k_from_a_prepared_tfds_dataset(tmp_path):
  """tfds:gsm8k read with as_data_source from a local data_dir; preparing it here feeds the
  builder local files instead of downloading."""
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  from unittest import mock
  from tensorflow_datasets.text.gsm8k import gsm8k as builder_module

  lines = {
      "train": [
          {
              "question": f"What is {i} + {i}?",
              "answer": f"{i}+{i}=<<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i:,}",
          }
          for i in range(998, 1006)
      ],
      "test": [{"question": "What is 2 - 5?", "answer": "2-5=-3\n#### -3"}],
  }
  files = {}
  for split, records in lines.items():
    path = tmp_path / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    files[split] = files[f"{split}_socratic"] = str(path)
  with mock.patch.object(
      tfds.download.DownloadManager, "download_and_extract", lambda self, urls: files
  ):
    builder_module.Gsm8k(
        data_dir=str(tmp_path / "tfds"), file_format="array_record"
    ).download_and_prepare()
  t = task("gsm8k", source="tfds:gsm8k", data_path=str(tmp_path / "tfds"), num_val=2)
  assert sizes(t) == {"train": 6, "val": 2, "test": 1}
  train_golds = sorted(int(e.gold) for s in ("train", "val") for e in t.splits()[s])
  assert train_golds == [2 * i for i in range(998, 1006)]  # '1,996' read as 1996
  assert t.splits()["test"][0].gold == "-3"
  with pytest.raises(DataError, match=r"tfds:gsm8k split 'train' is not prepared in"):
    task("gsm8k", source="tfds:gsm8k", data_path=str(tmp_path / "empty")).splits()
  with pytest.raises(ValueError, match=r"task.source: svamp reads files only"):
    task("svamp", source="tfds:svamp")
