"""Faults a long run meets: kills at every durable write (raised in-process, and a real SIGKILL
of a run's process), damaged checkpoints, diverging training, a real full filesystem. Each ends
with the uninterrupted run's results or one clear error, never garbage."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tailored_jax import checkpointing, rounds
from tailored_jax import workdir as wd
from tailored_jax.teacher.cache import ReplyCache
from tailored_jax.train import step as step_lib
from tailored_jax.train.trainer import NonFiniteError
from tests.test_rounds import cache_lines, read, tiny_config
from tests.processes import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Kill(Exception):
  """Stands for the process dying right after the write it is raised from."""


def strip_seconds(records):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def kill_after(monkeypatch, kind: str, name: str, nth: int):
  """Raises Kill right after the `nth` write of `kind` whose path ends with `name`."""
  seen = {"n": 0}

  def hit(path):
    if str(path).rstrip("/").endswith(name):
      seen["n"] += 1
      if seen["n"] == nth:
        raise Kill(f"killed after {kind} write #{nth} of {name}")

  if kind == "json":
    real = wd._write
    monkeypatch.setattr(wd, "_write", lambda path, data: (real(path, data), hit(path)))
  elif kind == "cache":
    real_put = ReplyCache.put
    monkeypatch.setattr(ReplyCache, "put", lambda self, *a: (real_put(self, *a), hit(self.path)))
  elif kind == "checkpoint":  # round params (synchronous) or a step checkpoint (in flight)
    real_save = checkpointing._save
    monkeypatch.setattr(
        checkpointing,
        "_save",
        lambda mngr, directory, step, tree, **info: (
            real_save(mngr, directory, step, tree, **info),
            hit(directory),
        ),
    )
    real_step_save = checkpointing.StepCheckpoints.save
    monkeypatch.setattr(
        checkpointing.StepCheckpoints,
        "save",
        lambda self, step, state: (real_step_save(self, step, state), hit(self.directory)),
    )
  elif kind == "manifest":  # the Orbax files are committed, the manifest is not: a torn save
    monkeypatch.setattr(
        checkpointing,
        "manifest_arrays",
        lambda tree, sums: (_ for _ in ()).throw(Kill("killed before the manifest")),
    )


@pytest.mark.parametrize(
    "kind, name, nth",
    [
        ("json", "state.json", 3),  # state.json just recorded train_1 as done
        ("cache", "teacher_cache.jsonl", 5),  # mid-annotation, a paid reply just appended
        ("json", "teacher_data.jsonl", 2),  # D_2 written from feedback, feedback_1 not yet marked
        ("manifest", "", 1),  # a step checkpoint torn before its manifest
        ("checkpoint", "/round_1", 1),  # round 1's params saved, train.json not yet
        ("json", "mistakes.jsonl", 1),  # N_1 written, exam_1 not yet marked done
        ("json", "summary.json", 1),  # the summary written, best_round.json not yet
        # (a kill between phases and mid-training: tests/test_rounds.py)
    ],
)
def test_kill_at_every_durable_write_then_resume(
    kind, name, nth, reference, tmp_path, paid, monkeypatch
):
  workdir = str(tmp_path)
  with monkeypatch.context() as m:
    kill_after(m, kind, name, nth)
    with pytest.raises(Kill):
      rounds.run(tiny_config(), workdir)
  records = rounds.run(tiny_config(), workdir)
  assert strip_seconds(records) == strip_seconds(reference[1])
  assert paid["n"] == cache_lines(reference[0])  # every paid request reached the server once
  assert read(workdir, "round_2", "eval_test.jsonl") == read(
      reference[0], "round_2", "eval_test.jsonl"
  )
  assert json.loads(read(workdir, "best_round.json")) == json.loads(
      read(reference[0], "best_round.json")
  )
  if kind == "manifest":
    assert os.listdir(os.path.join(workdir, "checkpoints", "train_round_1.set_aside"))


def test_a_damaged_checkpoint_is_set_aside_and_training_falls_back(
    reference, tmp_path, monkeypatch
):
  """Killed once step checkpoints 2 and 4 exist; 4 KiB in the middle of step 4's largest file
  are overwritten. The resumed round must fall back to step 2 and end as the uninterrupted one."""
  workdir = str(tmp_path)
  cfg = tiny_config()
  cfg.train.checkpoint_every_steps = 2
  with monkeypatch.context() as m:
    kill_after(m, "checkpoint", "train_round_1", 2)
    with pytest.raises(Kill):
      rounds.run(cfg, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "train_round_1", "4")
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  with open(largest, "r+b") as f:
    f.seek(max(size // 2 - 2048, 0))
    f.write(os.urandom(min(4096, size)))
  with pytest.raises(rounds.RunStopped):
    rounds.run(cfg, workdir, stop_after="evaluate_1")
  assert json.loads(read(workdir, "round_1", "train.json"))["resumed_at_step"] == 2
  assert [
      n.split("-")[0]
      for n in os.listdir(os.path.join(workdir, "checkpoints", "train_round_1.set_aside"))
  ] == ["4"]
  for name in ("eval_test.jsonl", "eval_val.jsonl"):
    assert read(workdir, "round_1", name) == read(reference[0], "round_1", name)

  # Round params that fail verification stop the run, naming them.
  params_dir = os.path.join(workdir, "checkpoints", "round_1")
  manifest = os.path.join(params_dir, "0", checkpointing.MANIFEST)
  record = json.loads(read(manifest))
  first = sorted(record["arrays"])[0]
  record["arrays"][first]["hash64"] = f"{int(record['arrays'][first]['hash64'], 16) ^ 1:016x}"
  with open(manifest, "w") as f:
    json.dump(record, f)
  with pytest.raises(checkpointing.CheckpointError, match=rf"{params_dir}.*differ.*cannot be used"):
    rounds.run(cfg, workdir)


def test_a_non_finite_step_changes_nothing():
  from tests.test_model_and_decode import MODEL, _batch, _train_cfg
  from tailored_jax import sharding
  from tailored_jax.train.trainer import Trainer
  import ml_collections

  mesh = sharding.make_mesh(
      ml_collections.ConfigDict({"mesh": dict(data=1, fsdp=1, tensor=1, num_devices=1)})
  )
  trainer = Trainer(MODEL, _train_cfg(), mesh)
  state = trainer.new_state(trainer.init_params(0))
  lm, _ = _batch(np.random.default_rng(0))
  bad = lm.replace(target_weights=np.where(lm.target_mask, np.nan, 0.0).astype(np.float32))
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = trainer.step_fn()(state, trainer.put_batch(bad), None)
  assert not np.isfinite(float(metrics["loss"]))
  after = jax.device_get((state.params, state.opt_state))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert int(state.guard.nonfinite_run) == 1 and int(state.guard.first_bad_step) == 0
  state, metrics = trainer.step_fn()(state, trainer.put_batch(lm), None)
  assert int(state.guard.nonfinite_run) == 0 and int(state.guard.nonfinite_total) == 1
  assert float(state.guard.last_finite_loss) == float(metrics["loss"])
  assert not bool(step_lib.all_finite({"a": np.array([1.0, np.inf])}))


def test_diverging_training_stops_and_marks_nothing_done(tmp_path):
  cfg = tiny_config()
  cfg.train.lr = 1e30
  cfg.train.grad_clip = 0.0
  with pytest.raises(
      NonFiniteError,
      match=r"round 1: \d+ consecutive steps .* non-finite .*"
      r"train.lr \(now 1e\+30\).*not marked complete",
  ):
    rounds.run(cfg, str(tmp_path))
  state = json.loads(read(str(tmp_path), "state.json"))
  assert state["completed"] == ["prepare", "annotate"]
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints", "round_1"))


TINY = "from tests.test_rounds import tiny_config as get_config\n"


@pytest.fixture
def small_filesystem(tmp_path):
  """A 2 MiB tmpfs (a real filesystem that fills up), unmounted afterwards; needs root."""
  where = tmp_path / "fs"
  where.mkdir()
  mounted = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True, text=True
  )
  if mounted.returncode:
    pytest.skip(f"cannot mount a size-limited tmpfs here (root needed): {mounted.stderr.strip()}")
  try:
    yield where
  finally:
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize(
    "free_kib, error",
    [
        # the pre-check refuses a checkpoint that cannot fit, before Orbax writes a byte
        (
            96,
            "error: no space left on device for checkpoint {run}/checkpoints/train_round_1: "
            "needed ~1.2 MiB, 0.0 MiB free",
        ),
        # a real ENOSPC from write(2), mid-annotation: the replies appended before it are kept
        (
            48,
            "error: cannot append a paid teacher reply to {run}/teacher_cache.jsonl: no space "
            "left on device (0.0 MiB free); replies written before it are kept",
        ),
    ],
    ids=["checkpoint_pre_check", "enospc_in_teacher_cache"],
)
def test_a_full_disk_ends_with_one_clear_line_and_the_same_command_resumes(
    free_kib, error, small_filesystem, reference, tmp_path, paid
):
  """The workdir on a real 2 MiB filesystem filled to `free_kib` KiB: one `error:` line naming
  the path and the cause, exit code 1; once space is freed the same run ends with the
  uninterrupted run's results and pays only for replies the full disk kept from the cache."""
  filler = small_filesystem / "filler"
  subprocess.run(["fallocate", "-l", f"{2048 - free_kib}k", str(filler)], check=True)
  config = tmp_path / "tiny.py"
  config.write_text(TINY)
  run = str(small_filesystem / "run")
  result = subprocess.run(
      [sys.executable, "-m", "tailored_jax.main", f"--config={config}", f"--workdir={run}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=child_env(),
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == [error.format(run=run)], result.stderr[-2000:]
  recorded = read(run, "teacher_cache.jsonl").count("\n")  # a torn last line is no record
  filler.unlink()  # space freed, and more of it
  subprocess.run(["mount", "-o", "remount,size=16m", str(small_filesystem)], check=True)
  records = rounds.run(tiny_config(), run)
  assert strip_seconds(records) == strip_seconds(reference[1])
  assert paid["n"] == cache_lines(reference[0]) - recorded


# The start of a run's process that a test stops at its `nth` `point`: the arguments, `due()`
# and every reply the local teacher serves counted in `served_log` (as the provider bills).
SUBPROCESS_HEAD = textwrap.dedent("""
    import json, os, signal, sys
    config, workdir, point, nth, served_log = sys.argv[1:6]
    from tailored_jax.teacher import oracle
    seen = [0]

    def due():
      seen[0] += 1
      return seen[0] == int(nth)

    real_reply = oracle.reply
    def served(*args, **kwargs):
      with open(served_log, "a") as f:
        f.write(".")
      return real_reply(*args, **kwargs)
    oracle.reply = served
""")
SUBPROCESS_MAIN = textwrap.dedent("""
    sys.argv = ["main", "--config=" + config, "--workdir=" + workdir]
    from tailored_jax import main
    main.run()
""")

KILLER = SUBPROCESS_HEAD + textwrap.dedent("""
    import orbax.checkpoint as ocp
    from tailored_jax.teacher.cache import ReplyCache

    def die():  # no finally, no flush, no atexit: what a pre-empted VM or the OOM killer does
      os.kill(os.getpid(), signal.SIGKILL)

    if point == "teacher_cache":  # half of a paid reply's line reaches the disk
      real_put = ReplyCache.put
      def put(self, key, payload, texts, *rest):
        if due():
          line = json.dumps({"key": key, "request": payload, "texts": texts})
          with open(self.path, "a") as f:
            f.write(line[:len(line) // 2])
            f.flush()
            os.fsync(f.fileno())
          die()
        real_put(self, key, payload, texts, *rest)
      ReplyCache.put = put
    elif point == "checkpoint":  # a step checkpoint in flight; round params before the manifest
      real_save = ocp.CheckpointManager.save
      def save(self, *args, **kwargs):
        result = real_save(self, *args, **kwargs)
        if due():
          die()
        return result
      ocp.CheckpointManager.save = save
    elif point == "state":  # state.json's next version written, not yet renamed over it
      real_replace = os.replace
      def replace(src, dst):
        if str(dst).endswith("state.json") and due():
          die()
        real_replace(src, dst)
      os.replace = replace
""") + SUBPROCESS_MAIN


@pytest.mark.parametrize(
    "point, nth",
    [
        ("teacher_cache", 5),  # mid-annotation, the fifth paid reply torn in its append
        ("checkpoint", 1),  # a step checkpoint's asynchronous save in flight
        ("checkpoint", 2),  # round 1's params written by Orbax, their manifest not
        ("state", 3),  # state.json about to record train_1 as done
    ],
)
def test_sigkill_of_a_real_process_then_the_same_command_resumes(
    point, nth, reference, tmp_path, paid
):
  """A real SIGKILL of the run's process at a durable write: the same run resumed ends with the
  uninterrupted run's results, and pays again only for replies that never reached the cache."""
  config = tmp_path / "tiny.py"
  config.write_text(TINY)
  workdir, served_log = str(tmp_path / "run"), tmp_path / "served"
  served_log.touch()
  killed = subprocess.run(
      [sys.executable, "-c", KILLER, str(config), workdir, point, str(nth), str(served_log)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=child_env(),
  )
  assert killed.returncode == -9, killed.stderr[-3000:]
  recorded = read(workdir, "teacher_cache.jsonl").count("\n")  # a torn last line is no record
  if point == "teacher_cache":
    assert not read(workdir, "teacher_cache.jsonl").endswith("\n")
  records = rounds.run(tiny_config(), workdir)
  assert strip_seconds(records) == strip_seconds(reference[1])
  assert read(workdir, "round_2", "eval_test.jsonl") == read(
      reference[0], "round_2", "eval_test.jsonl"
  )
  assert cache_lines(workdir) == cache_lines(reference[0])
  assert paid["n"] == cache_lines(reference[0]) - recorded  # nothing recorded was paid twice
  assert len(served_log.read_text()) >= recorded
