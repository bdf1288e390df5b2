"""Provider batches (teacher.mode=batch) and Anthropic's Messages API against the local server:
every line billed once (counted at the server) through kills at each step of a batch's life and
the server's faults, and results identical to the sync run's."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from tailored_jax import failpoints
from tailored_jax.teacher import prompts
from tailored_jax.teacher.batch import BatchError, BatchOptions, Manifest
from tailored_jax.teacher.cache import ReplyCache
from tailored_jax.teacher.client import ChatClient, ChatRequest, TeacherBudgetError
from tailored_jax.teacher.server import DEFAULT_MODEL, LocalTeacherServer
from tailored_jax.teacher.server_batches import FAULTS
from tests.test_teacher import PROBLEM
from tests.test_teacher_cli import requests_file

KEY = "sk-batch-test"
PRICE = (1.0, 2.0)  # USD per million tokens
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chat_requests(count: int = 6, n: int = 2) -> list[ChatRequest]:
  rows = []
  for i in range(count):
    question = dataclasses.replace(PROBLEM, start=5 + i).question()
    rows.append(ChatRequest(prompts.annotation_messages(question, []), n=n, tag=f"q{i}"))
  return rows


def client(server, tmp_path, protocol="openai", mode="batch", max_requests=0, **options):
  return ChatClient(
      server.url,
      DEFAULT_MODEL,
      api_key=KEY,
      cache=ReplyCache(str(tmp_path / "cache.jsonl"), prompts.PROMPT_VERSION),
      max_retries=2,
      backoff_s=0.0,
      protocol=protocol,
      mode=mode,
      batch_options=BatchOptions(poll_s=0.0, **options),
      batch_manifest=str(tmp_path / "batches.json"),
      price=PRICE,
      max_requests=max_requests,
  )


@pytest.fixture(scope="module")
def sync_reference(tmp_path_factory):
  """Each protocol's sync answers to `chat_requests()` and the bodies it billed."""
  out = {}
  for protocol in ("openai", "anthropic"):
    with LocalTeacherServer(api_key=KEY, seed=3) as server:
      results, usage = client(server, tmp_path_factory.mktemp(protocol), protocol, mode="sync").run(
          chat_requests()
      )
      out[protocol] = ([r.texts for r in results], dict(server.oracle_app.billed), usage)
  return out


def test_anthropic_messages_sync_reads_text_usage_and_stop_reason(tmp_path, sync_reference):
  texts, billed, usage = sync_reference["anthropic"]
  assert all(len(t) == 2 for t in texts) and usage.requests == 12 and usage.batch_requests == 0
  assert [prompts.parse_reply(t[0]).answer for t in texts] == [str((8 + i) * 2) for i in range(6)]
  assert sorted(billed.values()) == [2] * 6  # n=2: two calls of one sample each, same body
  with LocalTeacherServer(api_key=KEY, seed=3) as server:
    server.oracle_app.fail_next = [529]  # Anthropic's "overloaded": retried
    again, usage = client(server, tmp_path, "anthropic", mode="sync").run(chat_requests()[:1])
  assert again[0].texts == texts[0] and usage.retries == 1


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
@pytest.mark.parametrize("fault", [None, *FAULTS])
def test_a_batch_run_equals_the_sync_run_and_bills_each_line_once(
    protocol, fault, tmp_path, sync_reference
):
  """Faults: expired and errored lines go again in a smaller batch; a cut-short download is
  fetched again; results deleted by the provider are charged as lost and batched again (the
  one case where the server bills a line twice)."""
  texts, billed, sync_usage = sync_reference[protocol]
  with LocalTeacherServer(api_key=KEY, seed=3) as server:
    server.oracle_app.batches.faults = [fault] if fault else []
    teacher = client(server, tmp_path, protocol)
    results, usage = teacher.run(chat_requests(), label="annotate")
    got_billed = dict(server.oracle_app.billed)
    batches_made = server.oracle_app.batches.created
  assert [r.texts for r in results] == texts
  calls = sync_usage.requests
  assert usage.requests == usage.batch_requests == calls and usage.cache_hits == 0
  if fault == "files_deleted":
    assert got_billed == {k: 2 * v for k, v in billed.items()} and usage.charged_lost == calls
  else:
    assert got_billed == billed and usage.charged_lost == 0
  assert batches_made == (2 if fault in ("expire_partway", "errored_lines", "files_deleted") else 1)
  manifest = Manifest(str(tmp_path / "batches.json"))
  assert [b["state"] for b in manifest.batches] == ["done"] * batches_made
  # the batch price: half of what the same tokens cost sync, carried into a resumed budget
  resumed = client(server, tmp_path, protocol).budget
  sync_cost = (sync_usage.prompt_tokens * PRICE[0] + sync_usage.completion_tokens * PRICE[1]) / 1e6
  if fault == "files_deleted":  # and the lost lines at their worst case
    assert resumed.cost > sync_cost
  else:
    assert resumed.cost == pytest.approx(0.5 * sync_cost)


def test_no_batch_endpoints_means_sync_calls(tmp_path, sync_reference, caplog):
  texts, billed, _ = sync_reference["openai"]
  with LocalTeacherServer(api_key=KEY, seed=3, batch_api=False) as server:
    results, usage = client(server, tmp_path).run(chat_requests(), label="annotate")
    assert dict(server.oracle_app.billed) == billed
  assert [r.texts for r in results] == texts
  assert usage.batch_requests == 0 and usage.requests == 6
  assert "has no batch endpoints (HTTP 404); sending synchronously" in caplog.text


def test_past_the_deadline_a_batch_is_cancelled_its_answers_kept_and_the_rest_sent_sync(
    tmp_path, sync_reference, monkeypatch
):
  texts, billed, _ = sync_reference["openai"]

  class Killed(BaseException):
    pass

  def kill_at(name):
    if name == "batch_recorded":
      raise Killed

  with LocalTeacherServer(api_key=KEY, seed=3) as server:
    monkeypatch.setattr(failpoints, "reached", kill_at)
    with pytest.raises(Killed):
      client(server, tmp_path).run(chat_requests(), label="annotate")
    monkeypatch.undo()
    path = str(tmp_path / "batches.json")
    manifest = Manifest(path)
    (entry,) = manifest.batches
    entry["planned_at"] -= 25 * 3600  # the run was down for a day
    manifest.save()
    batches = server.oracle_app.batches
    batches.lines_per_poll = 2
    batches._advance(batches.batches[entry["batch_id"]])  # two lines answered meanwhile
    results, usage = client(server, tmp_path).run(chat_requests(), label="annotate")
    assert dict(server.oracle_app.billed) == billed
  assert [r.texts for r in results] == texts
  assert usage.batch_requests == 2 and usage.requests == 6
  assert Manifest(path).batches[0].get("cancelled") is True


def cli(server, requests, results, protocol, failpoint=None, mode="batch"):
  env = dict(os.environ, BATCH_KEY=KEY, PYTHONPATH=REPO)
  env.pop(failpoints.ENV, None)
  if failpoint:
    env[failpoints.ENV] = failpoint
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "tailored_jax.teacher",
          f"--requests={requests}",
          f"--results={results}",
          f"--base-url={server.url}",
          f"--model={DEFAULT_MODEL}",
          f"--protocol={protocol}",
          f"--mode={mode}",
          "--batch-poll-s=0",
          "--n=2",
          "--api-key-env=BATCH_KEY",
      ],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
  )


def answers(path) -> dict:
  return {r["id"]: r["texts"] for r in map(json.loads, open(path)) if "texts" in r}


KILLS = [
    ("openai", "batch_planned"),
    ("openai", "batch_uploaded"),
    ("openai", "batch_created"),
    ("openai", "batch_recorded"),
    ("openai", "batch_results"),
    ("openai", "batch_done"),
    ("anthropic", "batch_created"),
    ("anthropic", "batch_results"),
]


@pytest.mark.parametrize("protocol,point", KILLS)
def test_a_kill_at_every_step_of_a_batch_then_the_same_command(protocol, point, tmp_path):
  """SIGKILL at each step (planned, file uploaded, created but not yet recorded, recorded, half
  the results cached, done), then the same command: each line billed once at the server, the
  answers those of a sync run."""
  requests = tmp_path / "in.jsonl"
  requests_file(requests, 4)
  with LocalTeacherServer(api_key=KEY, seed=5) as server:
    sync = tmp_path / "sync.jsonl"
    done = cli(server, requests, sync, protocol, mode="sync")
    assert done.returncode == 0, done.stderr[-2000:]
    sync_billed = dict(server.oracle_app.billed)
    server.oracle_app.billed.clear()
    results = tmp_path / "out.jsonl"
    killed = cli(server, requests, results, protocol, failpoint=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = cli(server, requests, results, protocol)
    assert again.returncode == 0, again.stderr[-2000:]
    assert dict(server.oracle_app.billed) == sync_billed
    assert server.oracle_app.batches.created == 1
  assert answers(results) == answers(sync)
  if point == "batch_created":
    assert "re-attached" in again.stderr


def test_a_budget_batches_what_fits_and_stops_the_rest_in_one_line(tmp_path, sync_reference):
  """teacher.max_requests=3 of 6: three lines batched and billed; the others fail naming the
  budget, nothing else sent; a resumed client counts the three."""
  with LocalTeacherServer(api_key=KEY, seed=3) as server:
    results, usage = client(server, tmp_path, max_requests=3).run(chat_requests())
    assert sum(server.oracle_app.billed.values()) == 3 == usage.batch_requests
    assert client(server, tmp_path, max_requests=3).budget.requests == 3
  failed = [r for r in results if isinstance(r, TeacherBudgetError)]
  assert len(failed) == 3 and "teacher.max_requests=3 reached" in str(failed[0])
  texts = sync_reference["openai"][0]
  assert [r.texts for r in results if not isinstance(r, TeacherBudgetError)] == texts[:3]


def test_a_corrupt_manifest_is_refused_naming_the_file(tmp_path):
  path = tmp_path / "batches.json"
  path.write_text('{"version": 1, "batches": [')
  with LocalTeacherServer(api_key=KEY, seed=3) as server:
    with pytest.raises(BatchError, match=f"{path}: not a teacher batch manifest"):
      client(server, tmp_path).run(chat_requests(1))
  assert path.read_text() == '{"version": 1, "batches": ['


def test_a_batch_planned_but_never_created_before_the_deadline_is_not_created_late(
    tmp_path, sync_reference, monkeypatch
):
  texts, billed, _ = sync_reference["openai"]

  class Killed(BaseException):
    pass

  def kill_at(name):
    if name == "batch_planned":
      raise Killed

  with LocalTeacherServer(api_key=KEY, seed=3) as server:
    monkeypatch.setattr(failpoints, "reached", kill_at)
    with pytest.raises(Killed):
      client(server, tmp_path).run(chat_requests(), label="annotate")
    monkeypatch.undo()
    manifest = Manifest(str(tmp_path / "batches.json"))
    manifest.batches[0]["planned_at"] -= 25 * 3600
    manifest.save()
    results, usage = client(server, tmp_path).run(chat_requests(), label="annotate")
    assert server.oracle_app.batches.created == 0 and dict(server.oracle_app.billed) == billed
  assert [r.texts for r in results] == texts and usage.batch_requests == 0
  assert Manifest(str(tmp_path / "batches.json")).batches[0]["state"] == "done"
