"""Append-only JSON lines, kept as they arrive, on a local disk or on an object store.

Local: one file; each line appended, flushed and fsynced before `append` returns; a torn last
line (a kill mid-write) is dropped. Object stores cannot append: lines go to chunk objects
`PATH.chunks/<seq>-<writer>.jsonl`, each closed by a commit line (its line count and the
SHA-256 of the lines before it), so a chunk cut short is seen as uncommitted and skipped. A
background thread uploads whatever arrived while the previous upload ran (group commit), so a
line waits at most about one upload; `flush` waits for all of them. Readers read the file and
every committed chunk, wherever the log lives (a workdir copied between the two keeps its lines).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid

from tailored_jax import storage

_CHUNK = re.compile(r"^(\d{8})-([0-9a-f]+)\.jsonl$")
COMPACT_AT = 64  # committed chunks that make a writable log merge them into one on opening
_UPLOAD_TRIES = 5


class AppendLog:
  """`read(parse)` the lines already kept, `append(line)` more, `flush()` before relying on them
  being stored. `read_only` never writes, not even to drop a torn last line; `what` a line is,
  for errors."""

  def __init__(self, path: str, read_only: bool = False, what: str = "a line"):
    self.path = path
    self.what = what
    self.read_only = read_only
    self.chunk_dir = f"{path}.chunks"
    self._remote = storage.is_object_store(path)
    self._writer_id = uuid.uuid4().hex[:8]
    self._next_seq = 0
    self._pending: list[str] = []
    self._uploading = 0
    self._failure: Exception | None = None
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None

  # ---- reading --------------------------------------------------------------------------------
  def read(self, parse) -> list:
    """`parse(line: bytes)` of every kept line, file first, then chunks in order. `parse` raises
    ValueError, KeyError or TypeError for a bad line: an error naming file and line, except for
    the file's last line (torn by a kill: dropped with a warning, and cut off when writable)."""
    out = []
    if storage.exists(self.path) and not storage.is_dir(self.path):
      out += self._read_file(parse)
    chunks, left_by_a_merge = self._committed_chunks()
    for where, lines in chunks:
      for number, line in enumerate(lines, start=1):
        if not line.strip():
          continue
        try:
          out.append(parse(line))
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"{where}:{number}: {e}") from e
    if not self.read_only and self._remote:
      for where in left_by_a_merge:  # the deletes a kill cut short
        storage.remove(where)
      if len(chunks) >= COMPACT_AT:
        self._compact(chunks)
    return out

  def _read_file(self, parse) -> list:
    lines = storage.read_bytes(self.path).split(b"\n")
    out, good_bytes = [], 0
    for number, line in enumerate(lines, start=1):
      is_last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == b"")
      if not line.strip():
        good_bytes += len(line) + 1
        continue
      try:
        out.append(parse(line))
      except (ValueError, KeyError, TypeError) as e:
        if not is_last:
          raise ValueError(f"{self.path}:{number}: {e}") from e
        logging.warning("%s:%d: dropping a torn last line (%s)", self.path, number, e)
        if not self.read_only and not self._remote:
          with open(self.path, "rb+") as f:
            f.truncate(good_bytes)
        break
      good_bytes += len(line) + 1
    return out

  def _committed_chunks(self) -> tuple[list[tuple[str, list[bytes]]], list[str]]:
    """(where, lines) of each committed chunk, by sequence number, and where the chunks are that
    a merged chunk replaces (left behind by a kill during `_compact`): those and uncommitted
    ones are not read."""
    committed, replaced = [], set()
    for entry in storage.listdir(self.chunk_dir):
      match = _CHUNK.match(entry)
      if not match:
        continue
      self._next_seq = max(self._next_seq, int(match.group(1)) + 1)
      where = storage.join(self.chunk_dir, entry)
      parsed = _committed_lines(storage.read_bytes(where))
      if parsed is None:
        logging.warning("%s: no valid commit line (cut short while written); skipped", where)
        continue
      lines, replaces = parsed
      committed.append((entry, where, lines))
      replaced.update(replaces)
    kept = [(where, lines) for entry, where, lines in committed if entry not in replaced]
    return kept, [where for entry, where, _ in committed if entry in replaced]

  def _compact(self, chunks) -> None:
    """Many chunks merged into one: the merged chunk commits, naming the chunks it replaces,
    before any of them is deleted, so a kill in between leaves each line once to readers."""
    merged = [line for _, lines in chunks for line in lines if line.strip()]
    replaces = tuple(where.rsplit("/", 1)[-1] for where, _ in chunks)
    self._upload_chunk([line.decode("utf-8") + "\n" for line in merged], replaces)
    for where, _ in chunks:
      storage.remove(where)
    logging.info("%s: %d chunks merged into one", self.chunk_dir, len(chunks))

  # ---- writing --------------------------------------------------------------------------------
  def append(self, line: str) -> None:
    """`line` (one JSON document, ending in a newline) kept: on disk when this returns, locally;
    on an object store once the upload it joins commits (`flush` waits for that)."""
    if self.read_only:
      raise ValueError(f"{self.path} is a read-only recording")
    if not self._remote:
      try:
        with open(self.path, "a") as f:
          f.write(line)
          f.flush()
          os.fsync(f.fileno())
      except OSError as e:
        raise storage.StorageError(
            f"cannot append {self.what} to {self.path}: {storage.root_cause(e)}"
            f"{storage.space_note(self.path)}"
        ) from e
      return
    with self._cond:
      self._raise_failure()
      self._pending.append(line)
      if self._thread is None:
        if not self._next_seq:
          self._committed_chunks()  # numbers after the chunks already there
        self._thread = threading.Thread(target=self._upload_loop, daemon=True, name="append-log")
        self._thread.start()
      self._cond.notify_all()

  def flush(self) -> None:
    """Until every line appended so far is stored; a StorageError if an upload failed for good."""
    with self._cond:
      while (self._pending or self._uploading) and self._failure is None:
        self._cond.wait()
      self._raise_failure()

  def _raise_failure(self) -> None:
    if self._failure is not None:
      raise storage.StorageError(
          f"cannot append {self.what} to {self.chunk_dir}: {storage.root_cause(self._failure)}"
          f" ({len(self._pending)} not stored)"
      ) from self._failure

  def _upload_loop(self) -> None:
    while True:
      with self._cond:
        while not self._pending:
          self._cond.wait()
        batch, self._pending = self._pending, []
        self._uploading = len(batch)
      error = None
      for attempt in range(_UPLOAD_TRIES):
        try:
          self._upload_chunk(batch)
          error = None
          break
        except Exception as e:  # gcsfs and s3fs raise their own types
          error = e
          logging.warning("%s: upload failed (%s); try %d", self.chunk_dir, e, attempt + 1)
          time.sleep(0.5 * 2**attempt)
      with self._cond:
        self._uploading = 0
        if error is not None:
          self._pending = batch + self._pending
          self._failure = error
        self._cond.notify_all()
        if error is not None:
          self._thread = None
          return

  def _upload_chunk(self, lines: list[str], replaces: tuple[str, ...] = ()) -> None:
    body = "".join(lines).encode("utf-8")
    commit = {"commit": len(lines), "sha256": hashlib.sha256(body).hexdigest()}
    if replaces:
      commit["replaces"] = list(replaces)
    name = f"{self._next_seq:08d}-{self._writer_id}.jsonl"
    self._next_seq += 1
    storage.write_atomically(
        storage.join(self.chunk_dir, name), body + json.dumps(commit).encode() + b"\n"
    )


def _committed_lines(blob: bytes) -> tuple[list[bytes], list[str]] | None:
  """(lines, the chunks it replaces) of a chunk whose last line commits its lines (count and
  SHA-256), else None."""
  body, _, tail = blob.rstrip(b"\n").rpartition(b"\n")
  body = body + b"\n" if body else b""
  try:
    commit = json.loads(tail)
    count, digest = commit["commit"], commit["sha256"]
    replaces = [str(name) for name in commit.get("replaces", [])]
  except (ValueError, KeyError, TypeError):
    return None
  lines = body.split(b"\n")[:-1]
  if len(lines) != count or hashlib.sha256(body).hexdigest() != digest:
    return None
  return lines, replaces
