"""Reading benchmark files: JSON lists and JSONL, with errors that name the file, record and field.

With `skip_malformed`, bad records are counted (and the count reported) instead of failing;
nothing is ever dropped silently.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterator

from tailored_jax import storage


class DataError(ValueError):
  pass


def _where(path: str, number: int, jsonl: bool) -> str:
  return f"{path}:{number}" if jsonl else f"{path}[{number}]"


def iter_records(path: str) -> Iterator[tuple[str, Any]]:
  """(location, record) for each record of a .jsonl (line numbers) or .json list (indices)."""
  if not storage.exists(path):
    raise DataError(f"data file not found: {path}")
  try:
    text = storage.read_text(path)
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
  if path.endswith(".jsonl"):
    for number, line in enumerate(text.split("\n"), start=1):
      if not line.strip():
        continue
      try:
        yield _where(path, number, True), json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from e
    return
  try:
    data = json.loads(text)
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
  if (
      not isinstance(value, kind)
      or isinstance(value, bool)
      and bool not in (kind if isinstance(kind, tuple) else (kind,))
  ):
    raise DataError(f"{where}: field '{name}' has type {type(value).__name__}")
  return value


def load(path: str, parse: Callable[[Any, str], Any], skip_malformed: bool = False) -> list:
  """parse(record, where) over every record of a file; DataError stops unless skipping."""
  return load_records(iter_records(path), parse, skip_malformed, path)


# TFDS builders that hold one of our tasks (only GSM8K exists in tensorflow-datasets).
TFDS_BUILDER_MODULES = {"gsm8k": "tensorflow_datasets.text.gsm8k"}


def iter_tfds_records(name: str, split: str, data_dir: str) -> Iterator[tuple[str, Any]]:
  """(location, record) from a prepared TFDS dataset (array_record), never downloading."""
  if name not in TFDS_BUILDER_MODULES:
    raise DataError(
        f"config field task.source: no tensorflow-datasets builder for {name!r} "
        f"(have: {sorted(TFDS_BUILDER_MODULES)}); use the original files"
    )
  try:
    import importlib
    import tensorflow_datasets as tfds

    importlib.import_module(TFDS_BUILDER_MODULES[name])
  except ImportError as e:
    raise DataError(
        f"task.source=tfds:{name} needs tensorflow-datasets and array_record "
        f"(pip install -e '.[tfds]'): {e}"
    ) from e
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises AssertionError/DatasetNotFoundError/…
    where = data_dir or "~/tensorflow_datasets"
    raise DataError(
        f"tfds:{name} split {split!r} is not prepared in {where} (prepare it once "
        f"with file_format='array_record'): {e}"
    ) from e
  for index in range(len(source)):
    record = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in source[index].items()}
    yield f"tfds:{name}/{split}[{index}]", record


def load_records(
    records: Iterator[tuple[str, Any]],
    parse: Callable[[Any, str], Any],
    skip_malformed: bool = False,
    label: str = "",
) -> list:
  """parse(record, where) over (where, record) pairs; DataError stops unless skipping."""
  out, skipped = [], []
  for where, record in records:
    try:
      out.append(parse(record, where))
    except DataError as e:
      if not skip_malformed:
        raise
      skipped.append(str(e))
  if skipped:
    logging.warning("%s: skipped %d malformed records (first: %s)", label, len(skipped), skipped[0])
  return out
