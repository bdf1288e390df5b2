"""`python -m tailored_jax.bench.checkpoint`: what a step checkpoint costs the training loop, with
Orbax writing in the background (`StepCheckpoints`, as the trainer saves) against a synchronous
save of the same state, in one process: each train step's seconds without a save, the seconds
`save` blocks the loop, the steps' seconds while the save is in flight, and the seconds from a
save's start to the end of the steps that follow it (JSON).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tailored_jax import checkpointing, sharding
from tailored_jax.bench.common import PRESETS, report
from tailored_jax.bench.train_step import Shape, Work, train_cfg
from tailored_jax.models.llama import Llama
from tailored_jax.train.trainer import Trainer


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="llama_34m", choices=sorted(PRESETS))
  parser.add_argument("--shape", default="4x128", help="ROWSxTOKENS of each LM step")
  parser.add_argument("--steps_after", type=int, default=6, help="steps timed after each save")
  parser.add_argument("--saves", type=int, default=3)
  args = parser.parse_args(argv)
  mesh = sharding.make_mesh(
      ml_collections.ConfigDict({"mesh": dict(data=1, fsdp=1, tensor=1, num_devices=1)})
  )
  trainer = Trainer(Llama(PRESETS[args.model]), train_cfg(), mesh)
  state = trainer.new_state(trainer.init_params(0))
  lm, _ = Work.random(Shape.parse(args.shape), PRESETS[args.model].vocab_size).ours()
  lm = trainer.put_batch(lm)
  step = trainer.step_fn()

  def run_steps(n: int, state) -> tuple[list[float], object]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      state, metrics = step(state, lm, None)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - start)
    return times, state

  _, state = run_steps(3, state)  # compiled and warm
  plain, state = run_steps(args.steps_after * args.saves, state)
  sides = {}
  with tempfile.TemporaryDirectory() as root:
    for side in ("background", "synchronous"):
      blocked, during, span = [], [], []
      if side == "background":
        saver = checkpointing.StepCheckpoints(f"{root}/{side}")
        save, finish = saver.save, saver.close
      else:
        manager = checkpointing._manager(f"{root}/{side}", max_to_keep=2)
        save = lambda i, s, m=manager: checkpointing._save(m, f"{root}/{side}", i, s)
        finish = manager.close
      for i in range(1, args.saves + 1):
        jax.block_until_ready(state)
        start = time.perf_counter()
        save(i, state)
        blocked.append(time.perf_counter() - start)
        times, state = run_steps(args.steps_after, state)
        during.extend(times)
        span.append(time.perf_counter() - start)
      start = time.perf_counter()
      finish()
      sides[side] = {
          "save_blocks_loop_s": float(np.median(blocked)),
          "step_s_after_save_start": float(np.median(during)),
          "save_plus_steps_s": float(np.median(span)),
          "finish_s": time.perf_counter() - start,
      }
  state_bytes = checkpointing.nbytes(state)
  plain_step = float(np.median(plain))
  report(
      "checkpoint",
      model=args.model,
      shape=args.shape,
      state_mb=state_bytes / 1e6,
      orbax_version=ocp.__version__,
      step_s_without_save=plain_step,
      steps_after_each_save=args.steps_after,
      saves=args.saves,
      **sides,
      loop_seconds_saved_per_checkpoint=sides["synchronous"]["save_plus_steps_s"]
      - sides["background"]["save_plus_steps_s"],
  )


if __name__ == "__main__":
  main()
