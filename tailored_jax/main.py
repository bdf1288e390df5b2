"""`python -m tailored_jax.main --config=configs/NAME.py --workdir=DIR [--config.FIELD=VALUE]`.

Parses flags, sets up logging and (on pods) jax.distributed, then hands over to `rounds.run`.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (resumed if it exists)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "validate and print the config, then exit")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() (multi-host pods)"
)


def _stopping_errors() -> tuple[type[BaseException], ...]:
  """Failures a user fixes from one clear line: storage, damaged checkpoints, divergence, bad
  config or data, a teacher that failed for good."""
  from tailored_jax import checkpointing, config_lib
  from tailored_jax.data.sources import DataError
  from tailored_jax.student_io.hf_io import ModelImportError
  from tailored_jax.teacher.client import TeacherError
  from tailored_jax.train.trainer import NonFiniteError
  from tailored_jax.storage import StorageError

  return (
      StorageError,
      checkpointing.CheckpointError,
      NonFiniteError,
      config_lib.ConfigError,
      DataError,
      ModelImportError,
      TeacherError,
  )


class _QuietLibraries(logging.Filter):
  """Below --verbosity=1, libraries' own log lines (Orbax's option dumps and error tracebacks,
  asyncio's task reports) stay out of the terminal; ours and CRITICAL ones pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = record.name == "asyncio" or any(
        f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "asyncio")
    )
    return record.levelno >= logging.CRITICAL or not noisy


def _parse_flags(argv):
  """absl flag parsing, with unknown or mistyped config overrides reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: unknown config field in {bad}: {e}")


def main(argv):
  del argv
  if _CONFIG.value is None:
    sys.exit("error: --config is required")
  logging.getLogger().setLevel(logging.INFO)
  if flags.FLAGS.verbosity < 1:
    for handler in logging.getLogger().handlers:
      handler.addFilter(_QuietLibraries())
  import jax

  from tailored_jax import platforms

  platforms.skip_absent_tpu()
  if _DISTRIBUTED.value:
    from tailored_jax import cluster

    try:
      cluster.initialize()
    except cluster.ClusterError as e:
      sys.exit(f"error: {e}")
  from tailored_jax import config_lib, rounds, summary

  try:
    config_lib.validate(_CONFIG.value)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  if _DRY_RUN.value:
    print(_CONFIG.value.to_json(indent=2))
    return
  if _WORKDIR.value is None:
    sys.exit("error: --workdir is required")
  logging.info("devices: %s", jax.devices())
  from tailored_jax import preemption

  preemption.install(jax.process_count())
  try:
    records = rounds.run(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    print(
        f"preempted: {e}; the same command resumes (exit {preemption.EXIT_CODE})",
        file=sys.stderr,
    )
    sys.exit(preemption.EXIT_CODE)
  except _stopping_errors() as e:
    if flags.FLAGS.verbosity >= 1:
      logging.exception("the run stopped")
    sys.exit(
        f"error: {e}\n(the same command resumes once this is fixed; --verbosity=1 shows "
        "the traceback)"
    )
  print(summary.table(records))
  best = summary.best_round(records)
  if best:
    print(f"best round by validation: {best['round']} ({_WORKDIR.value}/{best['checkpoint']})")
  behind = summary.initial_ahead(records, best)
  if behind:
    print(behind)
  print(f"summary: {_WORKDIR.value}/summary.json, {_WORKDIR.value}/summary.png")


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
