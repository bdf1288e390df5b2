"""Named points where a test may kill the process for real (SIGKILL), to prove that what was
paid for survives a crash there: `TAILORED_JAX_FAILPOINT=NAME[:COUNT]` kills at the COUNT-th
(default first) time the code passes NAME. Unset, `reached` costs one dictionary lookup."""

from __future__ import annotations

import os
import signal
import sys

ENV = "TAILORED_JAX_FAILPOINT"
_passed: dict[str, int] = {}


def reached(name: str) -> None:
  chosen = os.environ.get(ENV)
  if not chosen:
    return
  target, _, count = chosen.partition(":")
  if target != name:
    return
  _passed[name] = _passed.get(name, 0) + 1
  if _passed[name] == int(count or 1):
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
