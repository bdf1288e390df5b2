"""One path layer for what a run reads and writes: local paths, and object stores (`gs://`,
`s3://`) through etils.epath, the layer Orbax and TensorStore use too.

Local paths take the plain `os` calls. An object cannot be renamed atomically or appended to,
but a PUT is all or nothing: `write_atomically` uploads the whole object, and append-style
files are chunk objects (`append_log`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

OBJECT_STORE_SCHEMES = ("gs://", "s3://")  # etils.epath reaches them through gcsfs and s3fs


class StorageError(OSError):
  """A write that failed (disk full, permissions, a vanished mount): says what, where and why."""


def is_object_store(path: str) -> bool:
  return str(path).startswith(OBJECT_STORE_SCHEMES)


def check_usable(path: str) -> None:
  """A StorageError naming `path` when a run cannot keep its workdir there: a URL other than
  gs://, or gcsfs not installed."""
  if "://" not in str(path):
    return
  if str(path).startswith("s3://"):  # the path layer reads and writes s3 (s3fs); Orbax cannot
    raise StorageError(
        f"{path}: s3:// workdirs are not supported: Orbax {_orbax_version()} cannot checkpoint "
        "there (its path normalisation keeps only gs://: arrays land in a local directory "
        "named 's3:'); use gs:// or a local or NFS path"
    )
  if not str(path).startswith("gs://"):
    raise StorageError(f"{path}: unsupported storage (local paths and gs://)")
  if importlib.util.find_spec("gcsfs") is None:
    raise StorageError(f"{path}: gs:// paths need gcsfs: pip install -e '.[cloud]'")


def _orbax_version() -> str:
  import importlib.metadata

  return importlib.metadata.version("orbax-checkpoint")


def _epath(path: str):
  from etils import epath  # imported on first use: gcsfs and friends load only for URLs

  return epath.Path(path)


def _fresh(path: str):
  """`path` for a read that must see the store as it is now: fsspec's listing cache dropped,
  since TensorStore (Orbax's arrays) and other processes write past it."""
  from etils.epath import backend

  try:
    backend.fsspec_backend.fs(path).invalidate_cache()
  except ImportError:  # no fsspec filesystem for it (epath's TensorFlow backend keeps no cache)
    pass
  return _epath(path)


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is."""
  return str(path) if is_object_store(path) else os.path.abspath(path)


def join(root: str, *parts: str) -> str:
  return os.path.join(str(root), *parts)


def parent(path: str) -> str:
  return os.path.dirname(str(path).rstrip("/"))


def name(path: str) -> str:
  return os.path.basename(str(path).rstrip("/"))


def exists(path: str) -> bool:
  return _fresh(path).exists() if is_object_store(path) else os.path.exists(path)


def is_dir(path: str) -> bool:
  return _fresh(path).is_dir() if is_object_store(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """A directory and its parents; nothing to do on an object store (prefixes need no making)."""
  if not is_object_store(path):
    os.makedirs(path or ".", exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names under `path` (sorted; [] when it does not exist)."""
  if is_object_store(path):
    p = _fresh(path)
    return sorted(c.name for c in p.iterdir()) if p.exists() else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def read_bytes(path: str) -> bytes:
  if is_object_store(path):
    return _fresh(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


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


def free_mib(path: str) -> float | None:
  """Free space on the local disk holding `path`; None for an object store."""
  if is_object_store(path):
    return None
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  return shutil.disk_usage(probe).free / 2**20


def space_note(path: str) -> str:
  """' (N MiB free)' for a local path, '' for an object store: the tail of a write error."""
  free = free_mib(path)
  return "" if free is None else f" ({free:.1f} MiB free)"


def write_atomically(path: str, data: str | bytes) -> None:
  """`data` as the whole of `path`; readers see the old content or the new, never half.
  Local: written beside it, flushed and renamed over it. Object store: one upload."""
  blob = data.encode("utf-8") if isinstance(data, str) else data
  try:
    if is_object_store(path):
      _epath(path).write_bytes(blob)
      return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    raise StorageError(f"cannot write {path}: {root_cause(e)}{space_note(path)}") from e


def remove(path: str) -> None:
  """A file or object; gone already is fine."""
  if is_object_store(path):
    _epath(path).unlink(missing_ok=True)
  elif os.path.exists(path):
    os.remove(path)


def remove_tree(path: str) -> None:
  """A directory (or prefix) and all under it; gone already is fine."""
  if is_object_store(path):
    _epath(path).rmtree(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def move_tree(source: str, target: str) -> None:
  """A directory moved to `target` (its parent made): a rename locally, copy then delete on an
  object store, where `source` stays readable until the copy is whole."""
  if is_object_store(source) or is_object_store(target):
    _copy_tree(source, target)
    remove_tree(source)
    return
  os.makedirs(os.path.dirname(target), exist_ok=True)
  os.replace(source, target)


def _copy_tree(source: str, target: str) -> None:
  for entry in listdir(source):
    src, dst = join(source, entry), join(target, entry)
    if is_dir(src):
      _copy_tree(src, dst)
    else:
      write_atomically(dst, read_bytes(src))
