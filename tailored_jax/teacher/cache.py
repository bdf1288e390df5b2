"""Persistent teacher reply cache: every paid reply is appended (and flushed) as it arrives.

A re-run with the same request (model, messages, n, temperature, max_tokens) reads the reply
back instead of paying again. A torn last line (a kill mid-write) is dropped with a warning;
a bad line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time

from tailored_jax.workdir import StorageError, free_mib, root_cause


def request_key(payload: dict) -> str:
  fields = {k: payload.get(k) for k in ("model", "messages", "n", "temperature", "max_tokens")}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class ReplyCache:
  """Replies by request key, loaded from `path` and appended to it; `read_only` (a replayed
  recording) never writes, not even to drop a torn last line."""

  def __init__(self, path: str, prompt_version: str, read_only: bool = False):
    self.path = path
    self.prompt_version = prompt_version
    self.read_only = read_only
    self._entries: dict[str, dict] = {}
    self._lock = threading.Lock()
    if os.path.exists(path):
      self._load()

  def _load(self) -> None:
    with open(self.path, "rb") as f:
      lines = f.read().split(b"\n")
    good_bytes = 0
    for number, line in enumerate(lines, start=1):
      is_last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == b"")
      if not line.strip():
        good_bytes += len(line) + 1
        continue
      try:
        entry = json.loads(line)
        key, texts = entry["key"], entry["texts"]
        if not isinstance(texts, list):
          raise ValueError("'texts' is not a list")
      except (ValueError, KeyError, TypeError) as e:
        if is_last:
          logging.warning("%s:%d: dropping a torn last line (%s)", self.path, number, e)
          if not self.read_only:
            with open(self.path, "rb+") as f:
              f.truncate(good_bytes)
          return
        raise ValueError(f"{self.path}:{number}: corrupt teacher cache entry ({e})") from e
      self._entries[key] = entry
      good_bytes += len(line) + 1

  def __len__(self) -> int:
    return len(self._entries)

  def models(self) -> list[str]:
    """The models the recorded requests were sent to."""
    return sorted({e.get("request", {}).get("model", "") for e in self._entries.values()} - {""})

  def get(self, key: str) -> dict | None:
    return self._entries.get(key)

  def put(
      self,
      key: str,
      payload: dict,
      texts: list[str],
      usage: dict,
      finish_reasons: list[str] | None = None,
  ) -> None:
    if self.read_only:
      raise ValueError(f"{self.path} is a read-only recording")
    entry = {
        "key": key,
        "prompt_version": self.prompt_version,
        "time": time.time(),
        "request": payload,
        "texts": texts,
        "usage": usage,
    }
    if finish_reasons and any(r != "stop" for r in finish_reasons):
      entry["finish_reasons"] = finish_reasons
    line = json.dumps(entry) + "\n"
    with self._lock:
      try:
        with open(self.path, "a") as f:
          f.write(line)
          f.flush()
          os.fsync(f.fileno())
      except OSError as e:
        raise StorageError(
            f"cannot append a paid teacher reply to {self.path}: {root_cause(e)} "
            f"({free_mib(self.path):.1f} MiB free); replies written before it are "
            "kept"
        ) from e
      self._entries[key] = entry
