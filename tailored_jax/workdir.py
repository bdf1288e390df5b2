"""The run directory (a local path or a `gs://`/`s3://` URL): atomic JSON/JSONL writes and
`state.json`, the record of completed phases.

On a multi-host run the workdir is shared and process 0 alone writes: elsewhere the writers
are no-ops, and processes meet at a barrier after every phase.
"""

from __future__ import annotations

import io
import json
import sys

from tailored_jax import storage


def is_writer() -> bool:
  """Process 0 of the run writes. A tool that never imported jax (the teacher CLI: it starts in
  a fraction of the time) is a single process."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


def _write(path: str, data: str | bytes) -> None:
  """The whole of `path`, atomically (`storage.write_atomically`); a no-op except on the writing
  process."""
  if is_writer():
    storage.write_atomically(path, data)


def write_json(path: str, obj) -> None:
  _write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str, text: str) -> None:
  _write(path, text)


def write_bytes(path: str, data: bytes) -> None:
  _write(path, data)


def write_figure(path: str, fig, **savefig_options) -> None:
  """A matplotlib figure as a PNG at `path` (any storage)."""
  png = io.BytesIO()
  fig.savefig(png, format="png", **savefig_options)
  _write(path, png.getvalue())


def read_json(path: str):
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def write_jsonl(path: str, records) -> None:
  _write(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str) -> list[dict]:
  out = []
  for number, line in enumerate(storage.read_text(path).split("\n"), start=1):
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
    self.path = storage.join(workdir, "state.json")
    self.completed: list[str] = []
    if storage.exists(self.path):
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
