"""Orbax checkpoints, verified: the train state mid-round (to resume a killed round) and params per
round, each with a manifest of per-array checksums written with it: position-keyed hash sums
(`shard_checksums`) computed on the devices where the arrays live, so no array is ever gathered
whole and a different mesh verifies the same sums.

Restores go straight onto the target shardings (a run can resume on a different mesh) and are
checked against the manifest. A step checkpoint that fails is set aside (moved, never deleted) and
the next older one is tried; round params that fail stop the run naming the directory.
"""

from __future__ import annotations

import datetime
import logging
import threading
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from tailored_jax import shard_checksums, sharding, storage
from tailored_jax import workdir as wd

MANIFEST = "tailored_manifest.json"


class CheckpointError(RuntimeError):
  pass


def _manager(directory: str, max_to_keep: int, on_commit=None) -> ocp.CheckpointManager:
  """Synchronous saves, or with `on_commit` asynchronous ones: `save` returns once the arrays
  are copied off the devices, Orbax writes them in the background (one save at a time) and
  calls `on_commit` after each commits."""
  return ocp.CheckpointManager(
      storage.absolute(directory),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep,
          create=True,
          enable_async_checkpointing=on_commit is not None,
          async_options=ocp.AsyncOptions(post_finalization_callback=on_commit)
          if on_commit
          else None,
      ),
  )


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def checksums(tree) -> dict[str, dict]:
  """Per leaf (by tree path): shape, dtype and its checksum (`hash64`), computed on the devices
  where the leaf lives (`shard_checksums`; every process calls it, as a train step)."""
  return manifest_arrays(tree, shard_checksums.tree_sums(tree))


def manifest_arrays(tree, sums) -> dict[str, dict]:
  """The manifest's entries from `shard_checksums.tree_sums(tree)` (read now)."""
  return {
      jax.tree_util.keystr(path): {
          "shape": list(leaf.shape),
          "dtype": str(np.dtype(leaf.dtype)),
          "hash64": shard_checksums.hex64(value),
      }
      for (path, leaf), value in zip(jax.tree_util.tree_leaves_with_path(tree), sums)
  }


def crc32_checksums(tree) -> dict[str, dict]:
  """The manifests written before `hash64` (CRC-32 of each whole array, gathered on the host),
  to verify checkpoints saved by earlier versions."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    array = np.ascontiguousarray(sharding.to_host(leaf))
    out[jax.tree_util.keystr(path)] = {
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "crc32": zlib.crc32(array.reshape(-1).view(np.uint8)),
    }
  return out


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def ensure_space(directory: str, needed: int) -> None:
  """Stops before a write that cannot fit: a StorageError naming the sizes."""
  free = storage.free_mib(directory)
  if free is not None and free < needed / 2**20:
    raise storage.StorageError(
        f"no space left on device for checkpoint {directory}: needed ~{needed / 2**20:.1f} MiB, "
        f"{free:.1f} MiB free"
    )


def _save(mngr: ocp.CheckpointManager, directory: str, step: int, tree, **info) -> None:
  ensure_space(directory, int(nbytes(tree) * 1.05) + 2**20)
  try:
    mngr.save(step, args=ocp.args.StandardSave(tree), force=True)
    mngr.wait_until_finished()
  except Exception as e:  # orbax wraps OS errors in many types: name the directory and the cause
    raise storage.StorageError(
        f"cannot save checkpoint {directory} step {step}: {storage.root_cause(e)}"
    ) from e
  manifest = {"step": step, **info, "arrays": checksums(tree)}
  wd.write_json(storage.join(directory, str(step), MANIFEST), manifest)


def _restore_verified(mngr: ocp.CheckpointManager, directory: str, step: int, like, shardings):
  """The checkpoint restored and checked against its manifest; CheckpointError says why not."""
  where = storage.join(directory, str(step))
  manifest_path = storage.join(where, MANIFEST)
  if not storage.exists(manifest_path):
    raise CheckpointError(f"{where}: no {MANIFEST} (the save did not finish)")
  try:
    expected = wd.read_json(manifest_path)["arrays"]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from e
  try:
    restored = mngr.restore(step, args=ocp.args.StandardRestore(_abstract(like, shardings)))
  except Exception as e:  # orbax raises many types on damaged files
    raise CheckpointError(f"{where}: cannot be restored ({storage.root_cause(e)})") from e
  earlier = any("crc32" in entry for entry in expected.values())
  got = crc32_checksums(restored) if earlier else checksums(restored)
  bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
  if bad:
    raise CheckpointError(
        f"{where}: {len(bad)} arrays differ from the manifest written with them, e.g. {bad[0]}"
    )
  return restored


class StepCheckpoints:
  """Step-numbered, verified checkpoints of one round's train state; keeps the newest two.
  Saved asynchronously: training goes on while Orbax writes, and a step's manifest is written
  once its save has committed (a checkpoint without one is never restored)."""

  def __init__(self, directory: str, round_index: int = 0):
    self.directory = directory
    self.round_index = round_index
    self._pending: dict[int, tuple] = {}  # step -> (header, array shapes, sums) until it commits
    self._lock = threading.Lock()
    self._failure: BaseException | None = None  # a manifest write that failed in the background
    self._saved: set[int] = set()  # steps this object saved (committed or in flight)
    self._mngr = _manager(directory, max_to_keep=2, on_commit=self._commit_manifests)

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def saved(self, step: int) -> bool:
    return step in self._saved or step in self.steps()

  def save(self, step: int, state) -> None:
    """Starts the save of `state` (returns once its arrays are off the devices, so the state
    may be donated to the next step); its checksums are computed on the devices behind it, and
    its manifest written after the save commits."""
    self._raise_failure()
    ensure_space(self.directory, int(nbytes(state) * 1.05) + 2**20)
    try:
      self._mngr.save(step, args=ocp.args.StandardSave(state), force=True)
      self._saved.add(step)
    except Exception as e:  # orbax wraps OS errors in many types: name the directory and cause
      raise storage.StorageError(
          f"cannot save checkpoint {self.directory} step {step}: {storage.root_cause(e)}"
      ) from e
    try:  # dispatched behind the step that made `state`; read when the save has committed
      sums = shard_checksums.tree_sums(state)
    except BaseException:
      self.wait()  # nothing in the background outlives the failure
      raise
    header = {"step": step, "round": self.round_index, "kind": "train_state"}
    arrays = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with self._lock:
      self._pending[step] = (header, arrays, sums)
    if not self._mngr.is_saving_in_progress():  # committed already: the callback has run
      self._commit_manifests()

  def _commit_manifests(self) -> None:
    """Writes the manifests of the saves that have committed (Orbax's background thread, or
    the caller's)."""
    with self._lock:
      for step in sorted(self._pending):
        where = storage.join(self.directory, str(step))
        if not storage.is_dir(where):
          continue
        header, arrays, sums = self._pending.pop(step)
        try:
          manifest = {**header, "arrays": manifest_arrays(arrays, sums)}
          wd.write_json(storage.join(where, MANIFEST), manifest)
        except BaseException as e:  # raised in the trainer's thread at the next save or wait
          self._failure = e

  def _raise_failure(self) -> None:
    if self._failure is not None:
      failure, self._failure = self._failure, None
      raise failure

  def wait(self) -> None:
    """Until the save in flight has committed and its manifest is written."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      raise storage.StorageError(
          f"cannot save checkpoint {self.directory}: {storage.root_cause(e)}"
      ) from e
    self._commit_manifests()
    self._raise_failure()

  def restore_latest_intact(self, like, shardings):
    """(step, state) of the newest checkpoint that restores and verifies, or None. Each one that
    fails is moved aside, with one log line."""
    self.wait()
    for step in reversed(self.steps()):
      try:
        return step, _restore_verified(self._mngr, self.directory, step, like, shardings)
      except CheckpointError as e:
        moved = self._set_aside(step)
        logging.warning("checkpoint failed verification, set aside as %s: %s", moved, e)
    return None

  def _set_aside(self, step: int) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = storage.join(f"{storage.absolute(self.directory)}.set_aside", f"{step}-{stamp}")
    if wd.is_writer():
      storage.move_tree(storage.join(self.directory, str(step)), target)
    sharding.barrier(f"set aside {self.directory} {step}")
    self._mngr.close()
    self._mngr = _manager(self.directory, max_to_keep=2, on_commit=self._commit_manifests)
    return target

  def close(self) -> None:
    """Waits for the save in flight (its manifest written), then closes."""
    try:
      self.wait()
    finally:
      self._mngr.close()


def save_params(directory: str, params, **info) -> None:
  """A round's final weights (params only), the unit later rounds and export start from."""
  mngr = _manager(directory, max_to_keep=1)
  try:
    if 0 in mngr.all_steps():  # a killed attempt's save; its round was never recorded as trained
      logging.warning(
          "replacing %s/0, saved by an attempt that did not finish its round", directory
      )
      mngr.delete(0)
    _save(mngr, directory, 0, params, kind="params", **info)
  finally:
    mngr.close()


def restore_params(directory: str, like, shardings):
  """Verified weights; a CheckpointError names the directory when they are missing or damaged."""
  mngr = _manager(directory, max_to_keep=1)
  try:
    if mngr.latest_step() is None:
      raise CheckpointError(f"no checkpoint in {directory}")
    return _restore_verified(mngr, directory, mngr.latest_step(), like, shardings)
  except CheckpointError as e:
    raise CheckpointError(
        f"{e}; these weights cannot be used (restore them from a backup, or "
        f"move {directory} away to retrain that round)"
    ) from e
  finally:
    mngr.close()
