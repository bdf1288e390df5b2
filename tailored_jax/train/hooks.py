"""What a training loop does every N steps, as hooks (as Levanter's `add_hook` and tunix's
`TrainingHooks`): the loop dispatches steps; each hook decides what to read from the device."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable

import jax

from tailored_jax.train import throughput


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """After step `step` (1-based) of `total` was dispatched: its state and metrics (device
  arrays, not yet read) and the tokens its batch held (host counts)."""

  round_index: int
  step: int
  total: int
  state: Any
  metrics: dict
  target_tokens: int
  input_tokens: int

  @property
  def last(self) -> bool:
    return self.step == self.total


class Hooks:
  """Hooks run in the order added: each every `every` steps, and at the last step if `at_end`
  (else never there)."""

  def __init__(self):
    self._hooks: list[tuple[Callable[[StepInfo], None], int, bool]] = []

  def add(self, hook: Callable[[StepInfo], None], every: int, *, at_end: bool) -> None:
    self._hooks.append((hook, every, at_end))

  def __call__(self, info: StepInfo) -> None:
    for hook, every, at_end in self._hooks:
      if info.last and at_end or not info.last and every and info.step % every == 0:
        hook(info)


class CompletedSteps:
  """Advances a `Progress` as steps finish on the device, not as they are dispatched: JAX runs
  ahead of the device, so a count of dispatched steps (and its rate and ETA) is wrong exactly
  where steps are slow. Each step's output is queued and counted once it is ready. At most
  `max_in_flight` steps run ahead of the host: the loop's checks between steps (a preemption
  signal) then act within that many steps, not after every step already queued."""

  def __init__(self, progress, max_in_flight: int = 2):
    self.progress = progress
    self.max_in_flight = max_in_flight
    self._pending: collections.deque = collections.deque()

  def dispatched(self, output) -> None:
    """`output`: an array the step produces (it is ready when the step is done)."""
    self._pending.append(output)
    self.poll()
    while len(self._pending) > self.max_in_flight:
      jax.block_until_ready(self._pending.popleft())
      self.progress.update(1)

  def poll(self) -> None:
    ready = 0
    while self._pending and self._pending[0].is_ready():
      self._pending.popleft()
      ready += 1
    if ready:
      self.progress.update(ready)

  def drain(self) -> None:
    """Waits for the steps still running, counting each as it ends."""
    self.poll()
    while self._pending:
      jax.block_until_ready(self._pending.popleft())
      self.progress.update(1)


class TrainLog:
  """The log-step hook: reads the step's metrics and the non-finite guard (one small device
  read), logs the loss and the window's rates, updates the progress display's fields and
  writes the train/* scalars. `count` (every step) adds each batch's tokens to the window."""

  def __init__(self, check_guard, flops, progress, metrics, step_offset: int = 0):
    self.check_guard, self.flops = check_guard, flops
    self.progress, self.metrics, self.step_offset = progress, metrics, step_offset
    self.window = throughput.Window()
    self.last: dict[str, float] = {}

  def count(self, info: StepInfo) -> None:
    self.window.add(info.target_tokens, info.input_tokens)

  def __call__(self, info: StepInfo) -> None:
    self.last = {k: float(v) for k, v in jax.device_get(info.metrics).items()}
    guard = self.check_guard(info.state, info.round_index, info.step)
    steps_per_s, tokens_per_s, inputs_per_s = self.window.rates()
    flops = self.flops(inputs_per_s)
    skipped = int(guard.nonfinite_total)
    logging.info(
        "round %d step %d/%d: loss %.4f (lm %.4f, sr %.4f), %.2f steps/s, "
        "%.0f target tokens/s, %s%s",
        info.round_index,
        info.step,
        info.total,
        self.last["loss"],
        self.last["lm_loss"],
        self.last["sr_loss"],
        steps_per_s,
        tokens_per_s,
        flops.text(),
        f", {skipped} non-finite steps skipped" if skipped else "",
    )
    self.progress.fields.update(loss=f"{self.last['loss']:.4f}", tokens_per_s=f"{tokens_per_s:.0f}")
    self.metrics.scalars(
        {
            **{f"train/{k}": v for k, v in self.last.items()},
            "train/steps_per_s": steps_per_s,
            "train/target_tokens_per_s": tokens_per_s,
            "train/model_tflops_per_device": flops.per_device_tflops,
            "train/mfu": flops.mfu,
            "train/nonfinite_steps_skipped": skipped,
        },
        self.step_offset + info.step,
    )
    self.window.reset()
