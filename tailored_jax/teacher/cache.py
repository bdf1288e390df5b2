"""Persistent teacher reply cache: every paid reply is kept as it arrives.

A re-run with the same request (model, messages, n, temperature, max_tokens) reads the reply
back instead of paying again. A torn last line (a kill mid-write) is dropped with a warning;
a bad line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time

from tailored_jax.append_log import AppendLog
from tailored_jax.storage import StorageError


def request_key(payload: dict) -> str:
  fields = {k: payload.get(k) for k in ("model", "messages", "n", "temperature", "max_tokens")}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class ReplyCache:
  """Replies by request key, loaded from `path` and appended to it (`append_log`: a local file,
  or chunk objects on an object store); `read_only` (a replayed recording) never writes, not
  even to drop a torn last line."""

  def __init__(self, path: str, prompt_version: str, read_only: bool = False):
    self.path = path
    self.prompt_version = prompt_version
    self.read_only = read_only
    self._log = AppendLog(path, read_only=read_only, what="a paid teacher reply")
    self._entries: dict[str, dict] = {}
    self._charges: list[dict] = []  # attempts billed whose replies were lost
    self._lock = threading.Lock()
    for entry in self._log.read(_parse_entry):
      if "charge" in entry:
        self._charges.append(entry)
      else:
        self._entries[entry["key"]] = entry

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
      batch_id: str = "",
  ) -> None:
    """Keeps a paid reply; `batch_id`: it came from that provider batch (billed at the batch
    price)."""
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
    if batch_id:
      entry["batch"] = batch_id
    with self._lock:
      try:
        self._log.append(json.dumps(entry) + "\n")
      except StorageError as e:
        raise StorageError(f"{e}; replies written before it are kept") from e
      self._entries[key] = entry

  def charge(
      self, key: str, reason: str, prompt_tokens: int, completion_tokens: int, batch_id: str = ""
  ) -> None:
    """Records an attempt that may have been billed although its reply was lost, so that the
    run's budget counts it after a resume too."""
    if self.read_only:
      return
    entry = {
        "key": key,
        "charge": reason,
        "time": time.time(),
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    if batch_id:
      entry["batch"] = batch_id
    with self._lock:
      self._log.append(json.dumps(entry) + "\n")
      self._charges.append(entry)

  def spent(self) -> "Spent":
    """What every invocation of the run paid for: the replies kept and the charged attempts
    whose replies were lost."""
    spent = Spent()
    for record in [*self._entries.values(), *self._charges]:
      usage = record.get("usage") or {}
      spent.add(
          int(usage.get("prompt_tokens", 0)),
          int(usage.get("completion_tokens", 0)),
          batch=bool(record.get("batch")),
      )
    return spent

  def flush(self) -> None:
    """Until every reply put so far is stored (an object store's uploads run behind `put`)."""
    if not self.read_only:
      self._log.flush()


@dataclasses.dataclass
class Spent:
  """Requests and tokens paid for; the `batch_*` part of the tokens at the batch price."""

  requests: int = 0
  prompt_tokens: int = 0
  completion_tokens: int = 0
  batch_requests: int = 0
  batch_prompt_tokens: int = 0
  batch_completion_tokens: int = 0

  def add(self, prompt: int, completion: int, batch: bool = False) -> None:
    self.requests += 1
    self.prompt_tokens += prompt
    self.completion_tokens += completion
    if batch:
      self.batch_requests += 1
      self.batch_prompt_tokens += prompt
      self.batch_completion_tokens += completion

  @property
  def tokens(self) -> int:
    return self.prompt_tokens + self.completion_tokens


def _parse_entry(line: bytes) -> dict:
  """A reply (key, texts) or a charge record (key, charge, usage)."""
  try:
    entry = json.loads(line)
    key = entry["key"]
    if "charge" in entry:
      usage = entry["usage"]
      int(usage["prompt_tokens"]) + int(usage["completion_tokens"])
      return entry
    texts = entry["texts"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"corrupt teacher cache entry ({e})") from e
  if not isinstance(key, str) or not isinstance(texts, list):
    raise ValueError("corrupt teacher cache entry ('key' is not a string or 'texts' not a list)")
  return entry
