"""`python -m tailored_jax.study --configs=A.py,B.py --seeds=N --workdir=DIR [--config.X=Y ...]`,
or `--grid=paper --config=BASE.py`: the paper's comparison as arms of one pretrained student's
config (`study/grid.py`).

Runs every (config, seed) as an ordinary run in DIR/<config>/seed_<seed>/ (resumable; a re-run
skips finished runs), one at a time, then writes DIR/study.json, study.md and study.png: means
with 95% Student-t intervals over seeds per config and round, and each config against the
first, paired by seed and by test question. Seeds are each config's own seed + 0..N-1; the
task's splits do not depend on them, so runs are paired by question. Run logs show with
--verbosity=1.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

_CONFIGS = flags.DEFINE_list("configs", None, "config files, the first is the baseline")
_SEEDS = flags.DEFINE_integer("seeds", 3, "seeds per config")
_WORKDIR = flags.DEFINE_string("workdir", None, "study directory (resumed if it exists)")
_GRID = flags.DEFINE_enum("grid", None, ["paper"], "run a grid of arms of --config instead")
_BASE = flags.DEFINE_string("config", None, "with --grid: the base config file")


def _parse(argv):
  """absl flags, leaving `--config.FIELD=VALUE` overrides (applied to every config)."""
  try:
    return flags.FLAGS(argv, known_only=True)
  except flags.Error as e:
    sys.exit(f"error: {e}")


def main(argv):
  overrides = argv[1:]
  unknown = [a for a in overrides if not a.startswith("--config.")]
  if unknown:
    sys.exit(f"error: unknown arguments {unknown}")
  if _GRID.value:
    return _grid(overrides)
  if not _CONFIGS.value or not _WORKDIR.value:
    sys.exit("error: --configs and --workdir are required")
  if _SEEDS.value < 1:
    sys.exit("error: --seeds must be >= 1")
  logging.getLogger().setLevel(logging.INFO)
  from tailored_jax import config_lib, platforms
  from tailored_jax import workdir as wd

  platforms.skip_absent_tpu()
  from tailored_jax.study import report, runs

  names = [runs.config_name(p) for p in _CONFIGS.value]
  if len(set(names)) != len(names):
    sys.exit(f"error: config file names must differ (they name the run folders): {names}")
  args_path = os.path.join(_WORKDIR.value, "study_args.json")
  current = {"configs": _CONFIGS.value, "overrides": overrides}
  if os.path.exists(args_path) and wd.read_json(args_path) != current:
    sys.exit(
        f"error: {_WORKDIR.value} holds a study of {wd.read_json(args_path)}; this command "
        f"asks for {current} (use another --workdir)"
    )
  try:
    base_seeds = {}
    for path in _CONFIGS.value:
      cfg = config_lib.from_file(path)
      config_lib.apply_overrides(cfg, overrides)
      base_seeds[path] = cfg.seed
  except (OSError, config_lib.ConfigError) as e:
    sys.exit(f"error: {e}")
  wd.write_json(args_path, current)
  plan = runs.plan(_CONFIGS.value, _SEEDS.value, _WORKDIR.value, base_seeds)
  try:
    runs.run_all(plan, overrides, quiet=flags.FLAGS.verbosity < 1)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  report.write(_WORKDIR.value, plan)
  print(open(os.path.join(_WORKDIR.value, "study.md")).read())


def _grid(overrides: list[str]) -> None:
  """The paper's grid: stage 1 (the full method, tailored rounds alone, answer-only, STaR),
  then plain distillation at the full method's teacher tokens; plain distillation first in the
  report (the baseline every arm is paired with)."""
  if _CONFIGS.value or not _BASE.value or not _WORKDIR.value:
    sys.exit("error: --grid takes --config=BASE.py and --workdir (not --configs)")
  logging.getLogger().setLevel(logging.INFO)
  from tailored_jax import config_lib, platforms
  from tailored_jax import workdir as wd

  platforms.skip_absent_tpu()
  from tailored_jax.study import grid, report, runs

  try:
    base = config_lib.from_file(_BASE.value)
    config_lib.apply_overrides(base, overrides)
  except (OSError, config_lib.ConfigError) as e:
    sys.exit(f"error: {e}")
  if not base.model.init_from:
    logging.warning(
        "study: the paper grid is meant for a pretrained student: one trained from scratch "
        "answers at chance at round 0 and gives STaR nothing right to learn from"
    )
  args_path = os.path.join(_WORKDIR.value, "study_args.json")
  current = {"grid": _GRID.value, "config": _BASE.value, "overrides": overrides}
  if os.path.exists(args_path) and wd.read_json(args_path) != current:
    sys.exit(f"error: {_WORKDIR.value} holds another study: {wd.read_json(args_path)}")
  wd.write_json(args_path, current)
  quiet = flags.FLAGS.verbosity < 1
  try:
    first = grid.arms(_BASE.value, _SEEDS.value, _WORKDIR.value, base.seed, stage=1)
    runs.run_all(first, overrides, quiet)
    full = [run for run in first if run.name == "tailored_reflection"]
    plain, matched = grid.plain_arm(
        _BASE.value, _SEEDS.value, _WORKDIR.value, base.seed, full, base.teacher.num_rationales
    )
    logging.warning("study: plain distillation asks %d rationales per question", matched)
    runs.run_all(plain, overrides, quiet)
  except (config_lib.ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  report.write(_WORKDIR.value, plain + first)
  print(open(os.path.join(_WORKDIR.value, "study.md")).read())


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
