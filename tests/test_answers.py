import pytest

from tailored_jax.data import answers


@pytest.mark.parametrize(
    "output, expected, rationale",
    [
        (" 3 + 4 = 7. So 7 apples.\nAnswer: 7", "7", " 3 + 4 = 7. So 7 apples.\nAnswer: 7"),
        (" 3 + 4 = 7.\nAnswer: 8\n\nQuestion: next 99", "8", " 3 + 4 = 7.\nAnswer: 8"),
        (" I think 12 then 15.", "15", " I think 12 then 15."),  # the regex takes the period
        (" It costs 2,125 dollars.", "2125", " It costs 2,125"),
        (" Therefore, the answer is -4. Then 9.", "-4", " Therefore, the answer is -4."),
        (" No numbers here.", None, " No numbers here."),
        (" 5 - 9 = -4\nAnswer: -4.", "-4", " 5 - 9 = -4\nAnswer: -4."),
        (" half is 2.50\nAnswer: 2.50", "2.50", " half is 2.50\nAnswer: 2.50"),
        (" It makes 18.00 dollars.", "18.00", " It makes 18.00"),
        (" 1 + 1 = 2\n\n\nAnswer: 5", "2", " 1 + 1 = 2"),
    ],
)
def test_extract_number(output, expected, rationale):
  got = answers.extract_number(output)
  assert got.answer == expected
  assert got.rationale == rationale


def test_answer_marker_wins_over_last_number():
  assert answers.extract_number(" 2 + 2 = 4\nAnswer: 4 apples, not 5").answer == "4"
  assert answers.extract_number(" x\nAnswer: none").error == "no_number_after_marker"


def test_is_correct():
  assert answers.is_correct("Yes", "yes")
  assert not answers.is_correct(None, "3")
  assert not answers.is_correct("30", "3")


def test_answers_are_strings_unless_numeric_equality_is_asked_for():
  """METHOD §5: string equality after the stated cleaning; 18.00 is not 18 in the paper's rule."""
  answer = answers.extract_number(" 9 * 2 = 18.00\nAnswer: 18.00").answer
  assert answer == "18.00" and not answers.is_correct(answer, "18")
  assert answers.is_correct(answer, "18", numeric=True)
  assert answers.is_correct("2.5", "2.50", numeric=True)
  assert not answers.is_correct("2.5", "2.50")
  assert not answers.is_correct("Yes", "18", numeric=True)
  assert not answers.is_correct(None, "18", numeric=True)


def test_numeric_equality_is_a_task_option_off_in_paper_configs():
  from tailored_jax import config_lib
  from tailored_jax.data import scoring
  from tailored_jax.data.tasks import Example, build_task

  cfg = config_lib.paper_config("gsm8k", "gptj")
  assert cfg.task.numeric_equality is False
  example = Example("x", "q", "18")
  cfg.task.name = "synthetic_arith"
  cfg.task.num_demos = 0
  strict = build_task(cfg.task)
  assert not scoring.score_output(strict, example, " 9 * 2 = 18.00\nAnswer: 18.00")["correct"]
  cfg.task.numeric_equality = True
  numeric = build_task(cfg.task)
  assert scoring.score_output(numeric, example, " 9 * 2 = 18.00\nAnswer: 18.00")["correct"]


@pytest.mark.parametrize(
    "output, expected",
    [
        (" Sharks are fish. So yes.\nAnswer: Yes", "Yes"),
        (" Yes, because it is.", "Yes"),
        (" Yesterday it rained, no doubt.", "No"),
        (" Nope. Therefore, the answer is no.", "No"),
        (" It is unknown.", None),
        (" yes\n\nAnswer: no", "Yes"),
    ],
)
def test_extract_yes_no(output, expected):
  assert answers.extract_yes_no(output).answer == expected


@pytest.mark.parametrize(
    "output, expected",
    [
        (" A bank has a revolving door. Therefore, the answer is bank (a).", "a"),
        (" Not (b) but (c). Therefore, the answer is mall (d).", "b"),
        (" No option here.\nTherefore, the answer is (e).", None),
        (" (E) fits best.", "e"),
    ],
)
def test_extract_choice(output, expected):
  assert answers.extract_choice(output).answer == expected
