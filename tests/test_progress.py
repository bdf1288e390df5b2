"""Progress: a tqdm bar on a terminal, periodic log lines elsewhere, nothing on other hosts."""

import io
import logging

from tailored_jax import progress as progress_lib
from tailored_jax.progress import Progress


class Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_without_a_terminal_it_logs_a_line_every_interval_and_at_the_end(caplog):
  clock = Clock()
  with caplog.at_level(logging.INFO):
    with Progress("exam 1", 10, "prompts", every_s=30.0, stream=io.StringIO(), clock=clock) as p:
      clock.now += 10
      p.update(3, tokens_per_s=5)  # 10 s in: too soon for a line
      clock.now += 20
      p.update(3)  # 30 s in: 6 done, 0.2/s, 4 left -> 20 s
      clock.now += 5
      p.update(4)
  lines = [r.getMessage() for r in caplog.records]
  assert lines == [
      "exam 1: 6/10 prompts (60%), 0.2 prompts/s, ETA 0:20, tokens_per_s 5",
      "exam 1: 10/10 prompts (100%), 0.286 prompts/s, ETA 0:00, tokens_per_s 5",
  ]


def test_a_resumed_phase_counts_its_rate_from_where_it_resumed():
  clock = Clock()
  p = Progress("train 2", 100, "steps", stream=io.StringIO(), clock=clock, start=40)
  clock.now += 3600
  p.update(30)
  assert p.line() == "train 2: 70/100 steps (70%), 0.00833 steps/s, ETA 1:00:00"


def test_on_a_terminal_it_is_a_bar(caplog):

  class Terminal(io.StringIO):

    def isatty(self):
      return True

  stream = Terminal()
  with caplog.at_level(logging.INFO):
    with Progress("annotate", 8, "requests", stream=stream) as p:
      p.update(3, tokens=120)
  assert "annotate" in stream.getvalue() and "3/8" in stream.getvalue()
  assert "tokens=120" in stream.getvalue() and not caplog.records


def test_other_processes_show_nothing(monkeypatch, caplog):
  monkeypatch.setattr(progress_lib.wd, "is_writer", lambda: False)
  with caplog.at_level(logging.INFO):
    with Progress("exam 1", 2, "prompts", every_s=0.0, stream=io.StringIO()) as p:
      p.update(2)
  assert not caplog.records
