"""The run directory: atomic JSON/JSONL writes and `state.json`, the record of completed phases.

On a multi-host run the workdir is shared and process 0 alone writes: elsewhere the writers
are no-ops, and processes meet at a barrier after every phase.
"""

from __future__ import annotations

import json
import os
import shutil

import jax


def is_writer() -> bool:
  return jax.process_index() == 0


class StorageError(OSError):
  """A write that failed (disk full, permissions, a vanished mount): says what, where and why."""


def root_cause(error: BaseException) -> str:
  """The innermost OS error under `error` (libraries wrap them), as 'strerror' or the message."""
  seen, e = set(), error
  innermost = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError):
      innermost = e
    e = e.__cause__ or e.__context__
  if isinstance(innermost, OSError) and innermost.strerror:
    return innermost.strerror.lower()
  return f"{type(innermost).__name__}: {innermost}"


def free_mib(path: str) -> float:
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  return shutil.disk_usage(probe).free / 2**20


def _write_atomically(path: str, write) -> None:
  """`write(file)` into `path.tmp`, then renamed over `path`: readers see old or new, never half.
  A no-op except on the writing process."""
  if not is_writer():
    return
  tmp = path + ".tmp"
  try:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "w") as f:
      write(f)
    os.replace(tmp, path)
  except OSError as e:
    raise StorageError(
        f"cannot write {path}: {root_cause(e)} ({free_mib(path):.1f} MiB free)"
    ) from e


def write_json(path: str, obj) -> None:

  def write(f):
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")

  _write_atomically(path, write)


def write_text(path: str, text: str) -> None:
  _write_atomically(path, lambda f: f.write(text))


def read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def write_jsonl(path: str, records) -> None:
  _write_atomically(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from e
  return out


class RunState:
  """Which phases of the run are done; saved after every phase, so a re-run skips them."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "state.json")
    self.completed: list[str] = []
    if os.path.exists(self.path):
      data = read_json(self.path)
      if not isinstance(data, dict) or not isinstance(data.get("completed"), list):
        raise ValueError(f"{self.path}: field 'completed' must be a list of phase names")
      self.completed = data["completed"]

  def done(self, phase: str) -> bool:
    return phase in self.completed

  def mark(self, phase: str) -> None:
    if phase not in self.completed:
      self.completed.append(phase)
    write_json(self.path, {"completed": self.completed, "last_completed": phase})
