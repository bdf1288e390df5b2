"""Running a study's (config, seed) pairs as ordinary, resumable runs, one at a time."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import ml_collections

from tailored_jax import config_lib, rounds
from tailored_jax import workdir as wd
from tailored_jax.layout import Layout


@dataclasses.dataclass(frozen=True)
class Run:
  """One (config, seed) of a study and where it lives; a grid's arm names itself and carries
  its own overrides on the shared config file."""

  config_path: str
  seed: int
  workdir: str
  arm: str = ""
  overrides: tuple[str, ...] = ()

  @property
  def name(self) -> str:
    return self.arm or config_name(self.config_path)


def config_name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def plan(
    config_paths: list[str], seeds: int, study_dir: str, base_seeds: dict[str, int]
) -> list[Run]:
  """Every (config, seed): seeds are the config's own seed + 0..seeds-1, so seed 0 of a study is
  the config's ordinary run; runs live in DIR/<config>/seed_<seed>/."""
  runs = []
  for path in config_paths:
    for offset in range(seeds):
      seed = base_seeds[path] + offset
      runs.append(Run(path, seed, os.path.join(study_dir, config_name(path), f"seed_{seed}")))
  return runs


def is_done(run: Run) -> bool:
  return os.path.exists(Layout(run.workdir).summary)


def load_config(run: Run, overrides: list[str]) -> ml_collections.ConfigDict:
  cfg = config_lib.from_file(run.config_path)
  config_lib.apply_overrides(cfg, [*overrides, *run.overrides])
  cfg.seed = run.seed
  config_lib.validate(cfg)
  return cfg


def run_all(runs: list[Run], overrides: list[str], quiet: bool = True) -> int:
  """Runs what is not done yet, in order, with one progress line each; returns how many ran.
  A killed study resumes inside the run it was in (an ordinary run's resume)."""
  started = 0
  for i, run in enumerate(runs, 1):
    label = f"study: run {i}/{len(runs)} {run.name} seed {run.seed}"
    if is_done(run):
      logging.warning("%s: done before, skipped", label)
      continue
    logging.warning("%s: running in %s", label, run.workdir)
    cfg = load_config(run, overrides)
    start = time.time()
    root = logging.getLogger()
    level = root.level
    if quiet:
      root.setLevel(logging.WARNING)
    try:
      records = rounds.run(cfg, run.workdir)
    finally:
      root.setLevel(level)
    started += 1
    last = records[-1] if records else {}
    logging.warning(
        "%s: done in %.0fs, %d rounds, test accuracy %s",
        label,
        time.time() - start,
        len(records),
        last.get("test_accuracy"),
    )
  return started


def read_summary(run: Run) -> list[dict]:
  return wd.read_json(Layout(run.workdir).summary)
