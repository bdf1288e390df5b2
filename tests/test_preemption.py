"""Preemption: a real SIGTERM to the run's process in the teacher phase, mid-training and in the
exam; each time it stops at a safe point with exit code 75 and one line, training first saves a
checkpoint at that step, and the same command resumes to the uninterrupted run's results,
paying for no reply twice and losing none that was paid."""

import json
import os
import subprocess
import sys
import textwrap

from tailored_jax import preemption, rounds
from tests.test_faults import ROOT, SUBPROCESS_HEAD, SUBPROCESS_MAIN, strip_seconds
from tests.test_rounds import cache_lines, read, tiny_config
from tests.processes import child_env

TERMINATOR = SUBPROCESS_HEAD + textwrap.dedent("""
    from tailored_jax.train import hooks
    from tailored_jax.sample import decode

    def terminate():  # what TPU maintenance, a spot VM's reclaim or SLURM's end of job send
      os.kill(os.getpid(), signal.SIGTERM)

    if point == "teacher":
      counted = oracle.reply
      def serve_then_stop(*args, **kwargs):
        if due():
          terminate()
        return counted(*args, **kwargs)
      oracle.reply = serve_then_stop
    elif point == "train":
      real_call = hooks.Hooks.__call__
      def call(self, info):
        real_call(self, info)
        if due():
          terminate()
      hooks.Hooks.__call__ = call
    elif point == "exam":
      def stopping(real):  # static batches call the decoder, continuous slots advance
        def generate(self, *args, **kwargs):
          if due():
            terminate()
          return real(self, *args, **kwargs)
        return generate
      decode.Decoder.__call__ = stopping(decode.Decoder.__call__)
      decode.Decoder.advance = stopping(decode.Decoder.advance)
""") + SUBPROCESS_MAIN


# two requests in flight at a time, so a stop leaves requests not yet sent (a resumable field)
SLOW_TEACHER = """from tests.test_rounds import tiny_config


def get_config():
  config = tiny_config()
  config.teacher.max_concurrency = 2
  return config
"""


def _terminated_run(config, workdir, point, nth, served_log):
  done = subprocess.run(
      [sys.executable, "-c", TERMINATOR, str(config), workdir, point, str(nth), str(served_log)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=child_env(),
  )
  assert done.returncode == preemption.EXIT_CODE, done.stderr[-3000:]
  return [line for line in done.stderr.splitlines() if line.startswith("preempted: ")]


def test_sigterm_stops_at_a_safe_point_and_the_same_command_resumes(reference, tmp_path, paid):
  config = tmp_path / "tiny.py"
  config.write_text(SLOW_TEACHER)
  workdir, served_log = str(tmp_path / "run"), tmp_path / "served"
  served_log.touch()

  lines = _terminated_run(config, workdir, "teacher", 5, served_log)
  assert lines and "during the teacher phase" in lines[0] and "not sent" in lines[0], lines
  served = len(served_log.read_text())
  assert cache_lines(workdir) == served  # every reply served before the stop reached the cache

  lines = _terminated_run(config, workdir, "train", 2, served_log)
  assert lines and "round 1: saved at step 2/" in lines[0], lines
  assert "2" in os.listdir(os.path.join(workdir, "checkpoints", "train_round_1"))
  assert json.loads(read(workdir, "timings.json"))["train_1"] > 0  # the stopped attempt's time

  lines = _terminated_run(config, workdir, "exam", 2, served_log)  # the next batch or phase
  assert lines and ("between decode batches" in lines[0] or "before phase" in lines[0]), lines

  records = rounds.run(tiny_config(), workdir)
  assert strip_seconds(records) == strip_seconds(reference[1])
  assert read(workdir, "round_2", "eval_test.jsonl") == read(
      reference[0], "round_2", "eval_test.jsonl"
  )
  total = cache_lines(reference[0])
  assert cache_lines(workdir) == total
  assert len(served_log.read_text()) + paid["n"] == total  # nothing paid twice, none lost
