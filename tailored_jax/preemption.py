"""Preemption: SIGTERM (TPU maintenance, spot VMs, SLURM's end of a job) or SIGUSR1 (SLURM's
`--signal=USR1@SECONDS`) makes the run save at the next training step boundary that every
process agrees on, and stop with `EXIT_CODE`; the same command resumes from that checkpoint.

One process: a Python handler notes the signal; training checks it at every step, the teacher
client stops sending new requests (the ones in flight are received and cached: they are paid),
and the exam and evaluation stop between batches (nothing paid; they run again on resume).
Several processes (`jax.distributed`): JAX's preemption service catches SIGTERM on any process
and `reached_preemption_sync_point` names the same point on all of them: training steps, phase
boundaries and decode batches; SIGUSR1 is passed on to it as SIGTERM. (Process 0's teacher
client keeps sending there: its replies are cached as they arrive.)
"""

from __future__ import annotations

import os
import signal
import threading

from absl import logging

EXIT_CODE = 75  # EX_TEMPFAIL: stopped to be resumed, not failed
SIGNALS = ("SIGTERM", "SIGUSR1")

_noticed = threading.Event()
_installed: list = []
_sync_steps = [0]


class Preempted(RuntimeError):
  """The run stopped at a safe point after a preemption signal; resumable."""


def _note(signum, _frame) -> None:
  if not _noticed.is_set():
    logging.warning(
        "%s received: stopping at the next safe point (training saves a checkpoint first)",
        signal.Signals(signum).name,
    )
  _noticed.set()


def _forward_to_jax(signum, _frame) -> None:
  logging.warning("%s received: passed on as SIGTERM", signal.Signals(signum).name)
  os.kill(os.getpid(), signal.SIGTERM)


def install(processes: int) -> None:
  """Handlers for the process's lifetime (from the main thread; once)."""
  if _installed or threading.current_thread() is not threading.main_thread():
    return
  if processes == 1:
    for name in SIGNALS:
      signal.signal(getattr(signal, name), _note)
  else:  # JAX's preemption service holds SIGTERM; hand it SLURM's warning too
    signal.signal(signal.SIGUSR1, _forward_to_jax)
  _installed.append(processes)


def noticed() -> bool:
  """Whether this process saw a preemption signal (one process; multi-process runs agree at
  training steps through `reached`)."""
  return _noticed.is_set()


def next_sync_step() -> int:
  """The next id of a training step for `reached`: every process counts its steps alike over
  the whole run (JAX's sync points must increase)."""
  _sync_steps[0] += 1
  return _sync_steps[0]


def reached(step: int) -> bool:
  """Whether to stop after training step `step` (a counter every process advances alike): the
  same answer on every process."""
  import jax

  if jax.process_count() == 1:
    return _noticed.is_set()
  from jax.experimental import multihost_utils

  return multihost_utils.reached_preemption_sync_point(step)


def stop_if_noticed(where: str) -> None:
  """Raises `Preempted` at a safe point outside training (between phases, between decode
  batches): one process reads its own flag; several meet at a JAX preemption sync point (every
  process passes the same points in the same order), so all stop there or none does."""
  import jax

  stop = _noticed.is_set() if jax.process_count() == 1 else reached(next_sync_step())
  if stop:
    raise Preempted(f"stopped by a preemption signal {where}")


def reset() -> None:
  """Forget a noticed signal (tests run several runs in one process)."""
  _noticed.clear()
