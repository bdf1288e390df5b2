"""Reading benchmark files: JSON lists and JSONL, with errors that name the file, record and field.

With `skip_malformed`, bad records are counted (and the count reported) instead of failing;
nothing is ever dropped silently.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator


class DataError(ValueError):
  pass


def _where(path: str, number: int, jsonl: bool) -> str:
  return f"{path}:{number}" if jsonl else f"{path}[{number}]"


def iter_records(path: str) -> Iterator[tuple[str, Any]]:
  """(location, record) for each record of a .jsonl (line numbers) or .json list (indices)."""
  if not os.path.exists(path):
    raise DataError(f"data file not found: {path}")
  if path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          yield _where(path, number, True), json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from e
    return
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
  for index, record in enumerate(data):
    yield _where(path, index, False), record


def field(record: Any, name: str, where: str, kind: type | tuple = (str,)) -> Any:
  """record[name] with a type check; a DataError naming `where` and the field otherwise."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: record is not an object")
  if name not in record:
    raise DataError(f"{where}: missing field '{name}'")
  value = record[name]
  if not isinstance(value, kind) or isinstance(value, bool) and bool not in (
      kind if isinstance(kind, tuple) else (kind,)):
    raise DataError(f"{where}: field '{name}' has type {type(value).__name__}")
  return value


def load(path: str, parse: Callable[[Any, str], Any], skip_malformed: bool = False) -> list:
  """parse(record, where) over every record; DataError stops the load unless skipping."""
  out, skipped = [], []
  for where, record in iter_records(path):
    try:
      out.append(parse(record, where))
    except DataError as e:
      if not skip_malformed:
        raise
      skipped.append(str(e))
  if skipped:
    logging.warning("%s: skipped %d malformed records (first: %s)", path, len(skipped), skipped[0])
  return out
