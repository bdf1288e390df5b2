"""A `gs://` workdir against a Cloud Storage emulator on the loopback address: the append log's
chunk objects (committed ones read, cut-short ones skipped, many merged), and a whole run killed
mid-training that resumes from the bucket to the local run's results, paying for no reply twice;
its report, and the exported weights equal to the local run's."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tailored_jax import append_log, export, report, rounds, storage
from tests import gcs_emulator
from tests.test_faults import KILLER, ROOT, TINY, strip_seconds
from tests.test_rounds import cache_lines, read, tiny_config
from tests.processes import child_env

BUCKET = "tailored-test"


@pytest.fixture(scope="module")
def gcs():
  """The emulator's environment, set in this process (gcsfs, epath and TensorStore read it)."""
  with gcs_emulator.running(BUCKET) as url:
    env = gcs_emulator.environment(url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
      yield env
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v


def _lines(log):
  return log.read(json.loads)


def test_append_log_on_an_object_store_reads_committed_chunks_only(gcs, monkeypatch):
  path = f"gs://{BUCKET}/unit/log.jsonl"
  log = append_log.AppendLog(path)
  for i in range(3):
    log.append(json.dumps({"i": i}) + "\n")
  log.flush()
  assert _lines(append_log.AppendLog(path, read_only=True)) == [{"i": 0}, {"i": 1}, {"i": 2}]
  assert not storage.exists(path)  # nothing is appended to an object: chunks only

  # a chunk cut short in its upload (no valid commit line) is skipped; later ones are read
  storage.write_atomically(f"{path}.chunks/00000050-0badc0de.jsonl", '{"i": 99}\n{"commit": 1')
  later = append_log.AppendLog(path)
  later.append(json.dumps({"i": 3}) + "\n")
  later.flush()
  chunks = storage.listdir(f"{path}.chunks")
  assert chunks[-1].startswith("00000051-"), chunks  # numbered after every chunk there
  assert _lines(append_log.AppendLog(path, read_only=True)) == [{"i": i} for i in range(4)]

  # a bad line in a committed chunk is an error naming the chunk and the line
  body = b'{"i": 4}\nnot json\n'
  commit = json.dumps({"commit": 2, "sha256": hashlib.sha256(body).hexdigest()}).encode()
  bad = f"{path}.chunks/00000060-0badc0de.jsonl"
  storage.write_atomically(bad, body + commit + b"\n")
  with pytest.raises(ValueError, match=rf"{bad}:2: "):
    _lines(append_log.AppendLog(path, read_only=True))
  storage.remove(bad)

  # a writable log with many committed chunks merges them into one, losing nothing (2: the
  # first writer's uploads may have grouped its three lines into one chunk)
  monkeypatch.setattr(append_log, "COMPACT_AT", 2)
  assert _lines(append_log.AppendLog(path)) == [{"i": i} for i in range(4)]
  merged = [c for c in storage.listdir(f"{path}.chunks") if not c.endswith("0badc0de.jsonl")]
  assert len(merged) == 1, merged
  assert _lines(append_log.AppendLog(path, read_only=True)) == [{"i": i} for i in range(4)]


def test_a_kill_while_chunks_are_merged_leaves_each_line_once(gcs, monkeypatch):
  """The merged chunk commits before the chunks it replaces are deleted; a kill in between
  leaves both, and readers (and the next merge) must still see each line once."""
  path = f"gs://{BUCKET}/unit/merge_killed.jsonl"
  for i in range(3):  # one writer per line: three chunks
    log = append_log.AppendLog(path)
    log.append(json.dumps({"i": i}) + "\n")
    log.flush()
  assert len(storage.listdir(f"{path}.chunks")) == 3

  class Killed(BaseException):
    pass

  def killed(where):
    raise Killed(where)

  monkeypatch.setattr(append_log, "COMPACT_AT", 3)
  monkeypatch.setattr(append_log.storage, "remove", killed)
  with pytest.raises(Killed):
    append_log.AppendLog(path).read(json.loads)
  assert len(storage.listdir(f"{path}.chunks")) == 4  # the merged chunk beside the old three
  assert _lines(append_log.AppendLog(path, read_only=True)) == [{"i": i} for i in range(3)]

  monkeypatch.undo()  # the next writer finishes the merge
  assert _lines(append_log.AppendLog(path)) == [{"i": i} for i in range(3)]
  assert len(storage.listdir(f"{path}.chunks")) == 1
  assert _lines(append_log.AppendLog(path, read_only=True)) == [{"i": i} for i in range(3)]


def _gs_cache_lines(workdir):
  return len(append_log.AppendLog(f"{workdir}/teacher_cache.jsonl", read_only=True).read(bytes))


def test_a_gs_workdir_killed_mid_training_resumes_to_the_local_results(
    gcs, reference, tmp_path, paid
):
  config = tmp_path / "tiny.py"
  config.write_text(TINY)
  workdir, served_log = f"gs://{BUCKET}/run", tmp_path / "served"
  served_log.touch()
  killed = subprocess.run(  # SIGKILL while round 1's first step checkpoint is being written
      [sys.executable, "-c", KILLER, str(config), workdir, "checkpoint", "1", str(served_log)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=child_env(**gcs),
  )
  assert killed.returncode == -9, killed.stderr[-3000:]
  served = len(served_log.read_text())
  assert served and _gs_cache_lines(workdir) == served  # every paid reply is in the bucket

  records = rounds.run(tiny_config(), workdir)
  assert strip_seconds(records) == strip_seconds(reference[1])
  assert storage.read_text(f"{workdir}/round_2/eval_test.jsonl") == read(
      reference[0], "round_2", "eval_test.jsonl"
  )
  total = cache_lines(reference[0])
  assert _gs_cache_lines(workdir) == total
  assert served + paid["n"] == total  # no reply paid twice, none lost
  assert not os.path.exists(workdir) and not os.path.exists("gs:")  # nothing written locally
  events = storage.listdir(f"{workdir}/tensorboard")  # one file per invocation, as locally
  assert len(events) == 2 and all(storage.read_bytes(f"{workdir}/tensorboard/{e}") for e in events)

  report.main(["--workdir", workdir])
  assert "round" in storage.read_text(f"{workdir}/report.md")
  export.export(f"{workdir}/checkpoints/round_2", str(tmp_path / "from_gs"))
  export.export(os.path.join(reference[0], "checkpoints", "round_2"), str(tmp_path / "local"))
  assert (tmp_path / "from_gs" / "model.safetensors").read_bytes() == (
      tmp_path / "local" / "model.safetensors"
  ).read_bytes()


@pytest.mark.parametrize(
    "workdir, error",
    [
        ("az://box/run", "unsupported storage"),
        ("s3://bucket/run", "s3:// workdirs are not supported: Orbax .* cannot checkpoint"),
    ],
)
def test_a_workdir_the_run_cannot_keep_is_refused_before_anything_is_written(
    workdir, error, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(storage.StorageError, match=rf"^{workdir}: {error}"):
    rounds.Run(tiny_config(), workdir)
  assert not os.listdir(tmp_path)  # no local directory named after the URL
