"""`python -m tailored_jax.teacher`: the standalone annotation runner against the local server."""

import dataclasses
import json
import logging

import pytest

from tailored_jax.teacher import __main__ as runner
from tailored_jax.teacher import prompts
from tailored_jax.teacher.server import DEFAULT_MODEL, LocalTeacherServer
from tests.test_teacher import PROBLEM

KEY = "sk-batch-secret"


def requests_file(path, count):
  with open(path, "w") as f:
    for i in range(count):
      question = dataclasses.replace(PROBLEM, start=5 + i).question()
      f.write(
          json.dumps({"id": f"q{i}", "messages": prompts.annotation_messages(question, [])}) + "\n"
      )


def lines(path):
  return [json.loads(line) for line in open(path)]


def test_annotates_resumes_and_never_pays_twice(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("BATCH_KEY", KEY)
  requests, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  requests_file(requests, 6)
  args = [
      f"--requests={requests}",
      f"--results={results}",
      f"--model={DEFAULT_MODEL}",
      "--n=2",
      "--api-key-env=BATCH_KEY",
      "--max-retries=1",
  ]
  with LocalTeacherServer(api_key=KEY, seed=1) as server, caplog.at_level(logging.INFO):
    server.oracle_app.faults = ["401"]  # one request is refused (the message echoes the key)
    assert runner.main(args + [f"--base-url={server.url}"]) == 1
    first = lines(results)
    assert sorted(r["id"] for r in first) == [f"q{i}" for i in range(6)]
    assert sum("error" in r for r in first) == 1 and server.oracle_app.completions == 5
    assert all(len(r["texts"]) == 2 for r in first if "texts" in r)
    # a kill after a paid reply was cached but before its result line was written
    with open(results, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in first if "texts" in r and r["id"] != "q5")
    assert runner.main(args + [f"--base-url={server.url}"]) == 0
    assert server.oracle_app.completions == 6  # only the refused one is paid again
    final = [r for r in lines(results) if "texts" in r]
    assert sorted(r["id"] for r in final) == [f"q{i}" for i in range(6)]
    assert runner.main(args + [f"--base-url={server.url}"]) == 0  # nothing left to do
    assert server.oracle_app.completions == 6
  assert KEY not in caplog.text and KEY not in results.read_text()


def test_bad_request_lines_name_file_and_line(tmp_path):
  bad = tmp_path / "in.jsonl"
  bad.write_text('{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "again"}\n')
  with pytest.raises(SystemExit, match=r"in.jsonl:2: id 'a' repeats an earlier line"):
    runner.main([f"--requests={bad}", "--results=x", "--base-url=http://x", "--model=m"])
  bad.write_text('{"id": "a", "messages": "hi"}\n')
  with pytest.raises(SystemExit, match=r"in.jsonl:1: field 'messages' must be a list"):
    runner.main([f"--requests={bad}", "--results=x", "--base-url=http://x", "--model=m"])
