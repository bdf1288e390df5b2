"""`python -m tailored_jax.bench.feedback_stream`: the exam and the feedback phase of one round,
with the exam's mistakes streamed to the teacher as each decode batch ends against one after the
other, on the same trained student, in one process, against the loopback teacher answering each
request after `--reply_delay_s` (a provider's latency). Prints both arms' phase seconds and
whether their mistakes and teacher data are byte-identical (JSON).

Round 1 is trained once; each arm then runs exam_1 and feedback_1 on its own copy of that
workdir. Both arms build a fresh student runtime, so both compile the exam alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from tailored_jax import config_lib, platforms, rounds
from tailored_jax import workdir as wd
from tailored_jax.bench.common import report
from tailored_jax.layout import Layout


def phase_seconds(workdir: str, cfg, stream: bool) -> dict:
  cfg.teacher.stream_feedback = stream
  start = time.perf_counter()
  try:
    rounds.run(cfg, workdir, stop_after="feedback_1")
  except rounds.RunStopped:
    pass
  wall = time.perf_counter() - start
  timings = wd.read_json(Layout(workdir).timings)
  return {
      "exam_s": round(timings["exam_1"], 2),
      "feedback_s": round(timings["feedback_1"], 2),
      "exam_plus_feedback_s": round(timings["exam_1"] + timings["feedback_1"], 2),
      "wall_s": round(wall, 2),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--reply_delay_s", type=float, default=2.0)
  parser.add_argument("--max_train", type=int, default=0, help="task.max_train (0: the config's)")
  parser.add_argument("--workdir", default="", help="default: a temporary directory")
  args = parser.parse_args(argv)
  platforms.skip_absent_tpu()
  cfg = config_lib.from_file(args.config)
  cfg.rounds = max(cfg.rounds, 2)
  cfg.method.stop_patience = cfg.method.stop_min_mistakes = 0
  if args.max_train:
    cfg.task.max_train = args.max_train
  root = args.workdir or tempfile.mkdtemp(prefix="feedback_stream_")
  base = os.path.join(root, "trained")
  try:
    rounds.run(cfg, base, stop_after="evaluate_1")
  except rounds.RunStopped:
    pass
  cfg.teacher.local_reply_delay_s = args.reply_delay_s
  arms = {}
  for name, stream in (("sequential", False), ("streaming", True)):
    arm = os.path.join(root, name)
    shutil.rmtree(arm, ignore_errors=True)
    shutil.copytree(base, arm)
    arms[name] = phase_seconds(arm, cfg, stream)
  same = {
      f: _read(root, "sequential", f) == _read(root, "streaming", f)
      for f in ("round_1/mistakes.jsonl", "round_2/teacher_data.jsonl")
  }
  mistakes = len(_read(root, "streaming", "round_1/mistakes.jsonl").splitlines())
  seq, streamed = arms["sequential"], arms["streaming"]
  report(
      "feedback_stream",
      config=args.config,
      train_questions=len(_read(root, "trained", "data/train.jsonl").splitlines()),
      exam_samples=cfg.exam.num_samples,
      mistakes=mistakes,
      reply_delay_s=args.reply_delay_s,
      max_concurrency=cfg.teacher.max_concurrency,
      sequential=seq,
      streaming=streamed,
      saved_s=round(seq["exam_plus_feedback_s"] - streamed["exam_plus_feedback_s"], 2),
      speedup=round(seq["exam_plus_feedback_s"] / streamed["exam_plus_feedback_s"], 3),
      identical=same,
  )


def _read(root: str, arm: str, name: str) -> str:
  with open(os.path.join(root, arm, name)) as f:
    return f.read()


if __name__ == "__main__":
  main()
