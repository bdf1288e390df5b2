"""One progress display per phase: done/total, rate and ETA (plus the phase's own fields, e.g. the
loss). On a terminal it is a tqdm bar; elsewhere (CI, SLURM logs, a pipe) a log line at most every
`every_s` seconds and one at the end. Only the writing process shows it."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from tailored_jax import workdir as wd


def _clock_text(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:

  def __init__(
      self,
      label: str,
      total: int,
      unit: str,
      *,
      every_s: float = 30.0,
      stream=None,
      clock: Callable[[], float] = time.monotonic,
      start: int = 0,
  ):
    self.label, self.total, self.unit = label, total, unit
    self.every_s, self.clock = every_s, clock
    self.done = start
    self.fields: dict[str, str] = {}
    self._start_done = start
    self._started = clock()
    self._last_line = self._started
    stream = sys.stderr if stream is None else stream
    self.enabled = wd.is_writer()
    self._bar = None
    if self.enabled and getattr(stream, "isatty", lambda: False)():
      from tqdm import tqdm

      self._bar = tqdm(
          total=total,
          initial=start,
          desc=label,
          unit=unit,
          file=stream,
          dynamic_ncols=True,
          leave=True,
      )

  def update(self, n: int = 1, **fields) -> None:
    """`n` more done; `fields` (already formatted or numbers) shown beside the count."""
    self.done += n
    self.fields.update(
        {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in fields.items()}
    )
    if not self.enabled:
      return
    if self._bar is not None:
      if fields:
        self._bar.set_postfix(self.fields, refresh=False)
      self._bar.update(n)
    elif self.clock() - self._last_line >= self.every_s:
      self._log()

  def line(self) -> str:
    """The non-terminal form: `label: done/total unit (pct), rate unit/s, ETA m:ss[, fields]`."""
    elapsed = max(self.clock() - self._started, 1e-9)
    rate = (self.done - self._start_done) / elapsed
    pct = 100.0 * self.done / self.total if self.total else 100.0
    left = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta = _clock_text(left) if left != float("inf") else "?"
    extra = "".join(f", {k} {v}" for k, v in self.fields.items())
    return (
        f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.3g} "
        f"{self.unit}/s, ETA {eta}{extra}"
    )

  def _log(self) -> None:
    self._last_line = self.clock()
    logging.info("%s", self.line())

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    else:
      self._log()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
