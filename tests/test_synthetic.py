import random

from tailored_jax.data import answers, synthetic
from tailored_jax.data.formats import QAFormat


def test_splits_are_deterministic_and_disjoint():
  sizes = {"train": 200, "val": 50, "test": 80}
  a = synthetic.generate_splits(7, sizes, synthetic.Difficulty())
  b = synthetic.generate_splits(7, sizes, synthetic.Difficulty())
  assert a == b
  assert {k: len(v) for k, v in a.items()} == sizes
  texts = [p.question() for ps in a.values() for p in ps]
  assert len(set(texts)) == len(texts)
  c = synthetic.generate_splits(8, sizes, synthetic.Difficulty())
  assert [p.question() for p in c["train"]] != [p.question() for p in a["train"]]


def test_known_problem_text_and_answer():
  problem = synthetic.generate_splits(0, {"train": 1}, synthetic.Difficulty())["train"][0]
  assert problem.question() == (
      "Gus has 9 apples. Gus loses 5 apples. Gus loses 2 apples. "
      "Gus doubles the number of apples. How many apples does Gus "
      "have now?"
  )
  assert problem.answer == 4


def test_difficulty_knob():
  easy = synthetic.Difficulty(
      min_steps=1, max_steps=1, max_start=5, max_operand=3, operations="add"
  )
  for p in synthetic.generate_splits(1, {"train": 30}, easy)["train"]:
    assert len(p.steps) == 1 and p.steps[0].op == "add"
    assert 1 <= p.start <= 5 and 1 <= p.steps[0].operand <= 3
  hard = synthetic.Difficulty(min_steps=4, max_steps=4)
  assert all(len(p.steps) == 4 for p in synthetic.generate_splits(1, {"t": 30}, hard)["t"])


def test_parse_roundtrip_and_reference_rationales_score_right():
  problems = synthetic.generate_splits(3, {"train": 300}, synthetic.Difficulty())["train"]
  rng = random.Random(0)
  for p in problems:
    parsed = synthetic.parse_question(p.question())
    assert parsed.question() == p.question() and parsed.values() == p.values()
    assert min(p.values()) >= 0
    text = QAFormat().continuation("", synthetic.reference_rationale(p, rng=rng), str(p.answer))
    assert answers.extract_number(text).answer == str(p.answer)
    assert synthetic.first_wrong_step(p, text) is None


def test_first_wrong_step():
  p = synthetic.Problem(
      "Ava", "pens", 5, (synthetic.Step("add", 3, 0), synthetic.Step("mul", 2, 0)), "Ben"
  )
  assert p.values() == [5, 8, 16]
  assert synthetic.first_wrong_step(p, "5 + 3 = 8. 8 * 2 = 17.") == (2, "8 * 2 = 17")
  assert synthetic.first_wrong_step(p, "5 + 4 = 9. 9 * 2 = 18.") == (1, "5 + 4 = 9")
  assert synthetic.first_wrong_step(p, "5 + 3 = 8.") == (2, "")
