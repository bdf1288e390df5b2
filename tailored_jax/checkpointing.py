"""Orbax checkpoints: the train state mid-round (to resume a killed round) and params per round.

Restores go straight onto the target shardings, so a run can resume on a different mesh.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


class StepCheckpoints:
  """Step-numbered checkpoints of one round's train state; keeps the newest two."""

  def __init__(self, directory: str):
    self.directory = directory
    self._mngr = _manager(directory, max_to_keep=2)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state) -> None:
    self._mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    self._mngr.wait_until_finished()

  def restore(self, step: int, like, shardings):
    try:
      return self._mngr.restore(step, args=ocp.args.StandardRestore(_abstract(like, shardings)))
    except Exception as e:  # orbax raises many types; say which checkpoint failed
      raise CheckpointError(f"cannot restore {self.directory} step {step}: {e}") from e

  def close(self) -> None:
    self._mngr.close()


def save_params(directory: str, params) -> None:
  """The round's final weights (params only), the unit later rounds and export start from."""
  mngr = _manager(directory, max_to_keep=1)
  mngr.save(0, args=ocp.args.StandardSave(params), force=True)
  mngr.wait_until_finished()
  mngr.close()


def restore_params(directory: str, like, shardings):
  mngr = _manager(directory, max_to_keep=1)
  try:
    if mngr.latest_step() is None:
      raise CheckpointError(f"no checkpoint in {directory}")
    return mngr.restore(mngr.latest_step(),
                        args=ocp.args.StandardRestore(_abstract(like, shardings)))
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"cannot restore params from {directory}: {e}") from e
  finally:
    mngr.close()
