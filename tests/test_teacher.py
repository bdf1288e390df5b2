"""The loopback teacher's protocol, and the client's retries, errors and persistent cache."""

import json
import os
import urllib.error
import urllib.request

import pytest

from tailored_jax.data import synthetic
from tailored_jax.teacher import limits, prompts
from tailored_jax.teacher.cache import ReplyCache
from tailored_jax.teacher.client import ChatClient, ChatRequest, TeacherError
from tailored_jax.teacher.server import DEFAULT_MODEL, LocalTeacherServer

PROBLEM = synthetic.Problem(
    "Ava", "pens", 5, (synthetic.Step("add", 3, 0), synthetic.Step("mul", 2, 0)), "Ben"
)


@pytest.fixture(scope="module")
def server():
  with LocalTeacherServer(api_key="sk-test", seed=1) as s:
    yield s


def post(server, body, key="sk-test", path="/chat/completions", method="POST"):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(
      server.url + path,
      data=data if method == "POST" else None,
      method=method,
      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
  )
  try:
    with urllib.request.urlopen(request) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def annotation_body(n=3):
  return {
      "model": DEFAULT_MODEL,
      "n": n,
      "temperature": 0.7,
      "messages": prompts.annotation_messages(PROBLEM.question(), []),
  }


def test_completion_has_n_choices_usage_and_correct_rationales(server):
  status, body = post(server, annotation_body(n=3))
  assert status == 200
  assert body["object"] == "chat.completion" and body["model"] == DEFAULT_MODEL
  assert [c["index"] for c in body["choices"]] == [0, 1, 2]
  assert all(c["finish_reason"] == "stop" for c in body["choices"])
  usage = body["usage"]
  assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
  for choice in body["choices"]:
    reply = prompts.parse_reply(choice["message"]["content"])
    assert reply.answer == "16"
    assert "5 + 3 = 8" in reply.rationale and "8 * 2 = 16" in reply.rationale
  assert len({c["message"]["content"] for c in body["choices"]}) > 1


def test_feedback_names_first_wrong_step(server):
  body = {
      "model": DEFAULT_MODEL,
      "messages": prompts.feedback_messages(
          PROBLEM.question(), "Ava starts with 5. 5 + 3 = 8. 8 * 2 = 18.\nAnswer: 18", "16", []
      ),
  }
  status, reply = post(server, body)
  assert status == 200
  text = reply["choices"][0]["message"]["content"]
  assert text.startswith(
      "Feedback: Step 2 is wrong: you wrote 8 * 2 = 18, but it should be 8 * 2 = 16."
  )
  assert prompts.parse_reply(text).answer == "16"


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        ({"model": DEFAULT_MODEL}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        (dict(annotation_body(), n=0), 400, "n"),
        (dict(annotation_body(), temperature=3), 400, "temperature"),
        (dict(annotation_body(), model="gpt-9"), 404, "model"),
        (
            {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hello"}]},
            400,
            "messages",
        ),
    ],
)
def test_bad_requests_get_openai_error_bodies(server, body, status, param):
  got_status, got = post(server, body)
  assert got_status == status
  assert set(got["error"]) == {"message", "type", "param", "code"}
  assert got["error"]["param"] == param
  assert got["error"]["message"]


def test_auth_unknown_route_and_method(server):
  status, body = post(server, annotation_body(), key="wrong")
  assert (status, body["error"]["code"]) == (401, "invalid_api_key")
  status, body = post(server, annotation_body(), path="/nope")
  assert (status, body["error"]["code"]) == (404, "unknown_url")
  status, body = post(server, None, path="/chat/completions", method="GET")
  assert (status, body["error"]["code"]) == (405, "method_not_allowed")
  status, body = post(server, None, path="/models", method="GET")
  assert status == 200 and body["data"][0]["id"] == DEFAULT_MODEL


def test_client_retries_then_caches(server, tmp_path):
  cache = ReplyCache(str(tmp_path / "cache.jsonl"), "v")
  client = ChatClient(server.url, DEFAULT_MODEL, api_key="sk-test", cache=cache, backoff_s=0.0)
  server.oracle_app.fail_next = [429, 503]
  request = ChatRequest(prompts.annotation_messages(PROBLEM.question(), []), n=2)
  results, usage = client.run([request])
  assert usage.requests == 1 and usage.retries == 2 and usage.failures == 0
  assert len(results[0].texts) == 2
  served = server.oracle_app.completions
  again, usage2 = ChatClient(
      server.url, DEFAULT_MODEL, api_key="sk-test", backoff_s=0.0, cache=ReplyCache(cache.path, "v")
  ).run([request])
  assert server.oracle_app.completions == served  # nothing paid twice
  assert usage2.cache_hits == 1 and usage2.requests == 0
  assert usage2.cached_tokens == usage.tokens
  assert again[0].texts == results[0].texts


def test_client_reports_non_retryable_errors_and_gives_up(server, tmp_path):
  client = ChatClient(server.url, DEFAULT_MODEL, api_key="wrong", cache=None, backoff_s=0.0)
  results, usage = client.run([ChatRequest(prompts.annotation_messages("x", []))])
  assert isinstance(results[0], TeacherError) and "HTTP 401" in str(results[0])
  assert usage.retries == 0
  client = ChatClient(
      server.url, DEFAULT_MODEL, api_key="sk-test", cache=None, backoff_s=0.0, max_retries=1
  )
  server.oracle_app.fail_next = [500, 500]
  results, usage = client.run([ChatRequest(prompts.annotation_messages(PROBLEM.question(), []))])
  assert isinstance(results[0], TeacherError) and "gave up after 2 attempts" in str(results[0])


def test_client_without_n_support_sends_single_choice_requests(server, tmp_path):
  client = ChatClient(
      server.url,
      DEFAULT_MODEL,
      api_key="sk-test",
      backoff_s=0.0,
      cache=ReplyCache(str(tmp_path / "c.jsonl"), "v"),
      supports_n=False,
  )
  results, usage = client.run(
      [ChatRequest(prompts.annotation_messages(PROBLEM.question(), []), n=3)]
  )
  assert usage.requests == 3 and len(results[0].texts) == 3


def test_cache_drops_torn_last_line_and_rejects_corrupt_middle(tmp_path):
  path = str(tmp_path / "cache.jsonl")
  cache = ReplyCache(path, "v")
  cache.put("a", {"n": 1}, ["one"], {"prompt_tokens": 1, "completion_tokens": 1})
  with open(path, "a") as f:
    f.write('{"key": "b", "texts": ["tw')
  reloaded = ReplyCache(path, "v")
  assert len(reloaded) == 1 and reloaded.get("a")["texts"] == ["one"]
  reloaded.put("c", {"n": 1}, ["three"], {})
  assert len(ReplyCache(path, "v")) == 2
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join([lines[0], "garbage", lines[1]]) + "\n")
  with pytest.raises(ValueError, match=r"cache.jsonl:2: corrupt teacher cache entry"):
    ReplyCache(path, "v")


def test_parse_reply_formats():
  got = prompts.parse_reply("Feedback: x\nReasoning: a\nb = 3\nAnswer: 3 apples")
  assert got.rationale == "a b = 3" and got.answer == "3 apples"
  got = prompts.parse_reply("no format at all 7")
  assert got.rationale == "no format at all 7" and got.answer is None


def test_local_teacher_replies_depend_on_the_request_alone():
  """The oracle's slips and wordings are seeded by (server seed, request body): the order and
  concurrency in which requests arrive change nothing."""
  problems = [
      synthetic.Problem("Ava", "pens", a, (synthetic.Step("add", 3, 0),), "Ben")
      for a in range(1, 13)
  ]
  requests = [
      ChatRequest(prompts.annotation_messages(p.question(), []), n=3, temperature=0.7)
      for p in problems
  ]

  def replies(order, concurrency):
    with LocalTeacherServer(seed=5, error_rate=0.5) as s:
      client = ChatClient(s.url, DEFAULT_MODEL, cache=None, max_concurrency=concurrency)
      results, _ = client.run([requests[i] for i in order])
    return {i: r.texts for i, r in zip(order, results)}

  first = replies(list(range(12)), 1)
  assert replies(list(reversed(range(12))), 12) == first
  answers = [prompts.parse_reply(t).answer for texts in first.values() for t in texts]
  assert len(set(answers)) > len(problems)  # slips happen at error_rate 0.5


HIGH_CONCURRENCY = """
import json, sys
from tailored_jax.data import synthetic
from tailored_jax.teacher import limits, prompts
from tailored_jax.teacher.client import ChatClient, ChatRequest, TeacherError
from tailored_jax.teacher.server import DEFAULT_MODEL, LocalTeacherServer
problems = [synthetic.Problem("Ava", "pens", a, (synthetic.Step("add", b, 0),), "Ben")
            for a in range(1, 16) for b in range(1, 11)]
requests = [ChatRequest(prompts.annotation_messages(p.question(), []), n=1, temperature=0.7)
            for p in problems]
with LocalTeacherServer(reply_delay_s=1.0) as s:
  client = ChatClient(s.url, DEFAULT_MODEL, cache=None, max_concurrency=150, timeout_s=1.8,
                      backoff_s=0.0, max_retries=2)
  results, usage = client.run(requests)
  served = s.oracle_app.completions
print(json.dumps({"failed": sum(isinstance(r, TeacherError) for r in results),
                  "retries": usage.retries, "requests": usage.requests, "served": served}))
"""


def test_high_concurrency_with_slow_replies_pays_each_request_once():
  """150 requests in flight (above aiohttp's default pool of 100), each reply taking 1 s, and a
  1.8 s timeout per attempt: a timeout that counted time queued for a connection (1 s) would
  fire while the server serves the request (another 1 s), and the re-sent request would be paid
  twice. Run in a fresh process: the suite's large heap makes garbage-collection pauses that
  no timeout should have to absorb."""
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-c", HIGH_CONCURRENCY],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert got == {"failed": 0, "retries": 0, "requests": 150, "served": 150}  # paid once each


def test_dataset_teacher_answers_with_the_human_rationale():
  import random

  from tailored_jax.data.tasks import Example
  from tailored_jax.teacher.dataset import DatasetAnswers

  question = "Tom has 3 apples.  He buys 2 more. How many apples does he have?"
  answers = DatasetAnswers([Example("train-0", question, "5", "Tom has 3 + 2 = 5 apples.")], "t")
  rng = random.Random(0)
  texts = answers(prompts.annotation_messages(question, []), 2, rng)
  assert texts == ["Reasoning: Tom has 3 + 2 = 5 apples.\nAnswer: 5"] * 2
  reply = prompts.parse_reply(texts[0])
  assert (reply.rationale, reply.answer) == ("Tom has 3 + 2 = 5 apples.", "5")
  feedback = answers(prompts.feedback_messages(question, "Tom has 3 - 2 = 1.", "5", []), 1, rng)
  assert feedback[0].startswith("Feedback: ") and feedback[0].endswith(texts[0])
  with pytest.raises(ValueError, match="no human rationale for the question 'Sam has"):
    answers(prompts.annotation_messages("Sam has 4 pens. How many?", []), 1, rng)
  with pytest.raises(ValueError, match="task x has no human rationales"):
    DatasetAnswers([Example("train-0", question, "5")], "task x")


def test_gsm8k_human_rationale_drops_calculator_notes_and_the_answer_line():
  from tailored_jax.data.benchmarks import human_rationale

  solution = (
      "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
      "clips altogether in April and May.\n#### 72"
  )
  assert human_rationale(solution) == (
      "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = "
      "72 clips altogether in April and May."
  )


def test_a_read_only_recording_is_never_written(tmp_path):
  path = tmp_path / "teacher_cache.jsonl"
  good = json.dumps({"key": "k1", "texts": ["a"], "request": {"model": "m1"}})
  path.write_text(good + "\n" + '{"key": "k2", "te')  # a torn last line
  recording = ReplyCache(str(path), prompts.PROMPT_VERSION, read_only=True)
  assert recording.get("k1")["texts"] == ["a"] and recording.models() == ["m1"]
  assert path.read_text().endswith('"te')  # the torn line is left alone
  with pytest.raises(ValueError, match="read-only recording"):
    recording.put("k3", {}, ["b"], {})


RETRIED = ["429", "429_retry_after_seconds", "429_retry_after_date", "500", "503"]
RETRIED_AFTER_BILLING = ["timeout", "reset", "truncated", "malformed", "no_choices"]
REFUSED = ["400", "401", "403", "404"]


@pytest.mark.parametrize(
    "fault", RETRIED + RETRIED_AFTER_BILLING + ["null_content", "length", "no_usage"] + REFUSED
)
def test_every_fault_ends_once_as_a_success_or_a_failure_with_its_reason(fault, tmp_path):
  """One injected fault, then a healthy server: retryable faults succeed on the one retry (a
  reply lost in delivery was billed, so the server computed two, and the run's budget counts
  both, across a resume too: the lost one by the usage it reported, else its worst case);
  withheld or cut replies are successes whose finish reason says so; a reply without usage is
  charged an estimate; 4xx fail at once, naming the request, never the key."""
  key = "sk-secret-123"
  with LocalTeacherServer(api_key=key, seed=1) as server:
    server.oracle_app.faults = [fault]
    server.oracle_app.fault_delay_s = 1.0
    cache = ReplyCache(str(tmp_path / "cache.jsonl"), prompts.PROMPT_VERSION)
    client = ChatClient(
        server.url,
        DEFAULT_MODEL,
        api_key=key,
        cache=cache,
        max_retries=2,
        backoff_s=0.0,
        timeout_s=0.3,
    )
    request = ChatRequest(prompts.annotation_messages(PROBLEM.question(), []), n=2)
    results, usage = client.run([request])
    served = server.oracle_app.completions
  (result,) = results
  if fault in REFUSED:
    assert isinstance(result, TeacherError) and usage.retries == 0 and served == 0
    assert f"HTTP {fault} for request " in str(result) and key not in str(result)
    assert len(cache) == 0
    return
  assert not isinstance(result, TeacherError), result
  assert len(result.texts) == 2 and usage.requests == 1 and len(cache) == 1
  resumed = ChatClient(server.url, DEFAULT_MODEL, cache=ReplyCache(cache.path, "v")).budget
  assert (resumed.requests, resumed.tokens) == (client.budget.requests, client.budget.tokens)
  assert client.budget.requests == served
  if fault in RETRIED + RETRIED_AFTER_BILLING:
    assert usage.retries == 1 and result.finish_reasons == ["stop", "stop"]
    assert served == (2 if fault in RETRIED_AFTER_BILLING else 1)
    if fault in RETRIED_AFTER_BILLING:
      lost = client.budget.tokens - usage.tokens
      worst = limits.estimate_prompt_tokens(request.messages) + 2 * request.max_tokens
      assert lost == (usage.tokens if fault == "no_choices" else worst)  # reported, else worst
  elif fault == "no_usage":
    assert usage.tokens == limits.estimate_prompt_tokens(
        request.messages
    ) + limits.estimate_completion_tokens(result.texts)
  elif fault == "null_content":
    assert result.texts == ["", ""] and result.finish_reasons == ["content_filter"] * 2
  elif fault == "length":
    assert result.finish_reasons == ["length", "stop"] and len(result.texts[0].split()) == 4
  again, usage = ChatClient(server.url, DEFAULT_MODEL, api_key=key, cache=cache).run([request])
  assert usage.requests == 0 and again[0].texts == result.texts  # the cache: never paid twice
  assert again[0].finish_reasons == result.finish_reasons


def test_a_server_returning_fewer_choices_than_n_is_topped_up_singly(tmp_path):
  with LocalTeacherServer(seed=1) as server:
    server.oracle_app.faults = ["fewer_choices"]
    cache = ReplyCache(str(tmp_path / "cache.jsonl"), prompts.PROMPT_VERSION)
    client = ChatClient(server.url, DEFAULT_MODEL, cache=cache, backoff_s=0.0)
    results, usage = client.run(
        [ChatRequest(prompts.annotation_messages(PROBLEM.question(), []), n=3)]
    )
    assert len(results[0].texts) == 3 and usage.requests == 3
    assert server.oracle_app.completions == 3 and len(cache) == 3


def test_retry_after_reads_seconds_and_http_dates():
  from tailored_jax.teacher.client import retry_after_seconds

  assert retry_after_seconds("2.5") == 2.5 and retry_after_seconds(None) is None
  now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
  assert retry_after_seconds("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0
  assert retry_after_seconds("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0
  assert retry_after_seconds("soon") is None


def test_a_budget_holds_for_the_run_across_a_resume(tmp_path):
  """teacher.max_requests=3 for the run: a first invocation pays for 2 replies; a resumed one
  (a new client over the same cache) may pay for 1 more, and refuses the rest in one line."""
  requests = [
      ChatRequest(
          prompts.annotation_messages(
              synthetic.Problem("Ava", "pens", 5 + i, PROBLEM.steps, "Ben").question(), []
          ),
          n=1,
      )
      for i in range(5)
  ]
  path = str(tmp_path / "cache.jsonl")
  with LocalTeacherServer(api_key="k", seed=1) as server:
    client = lambda: ChatClient(
        server.url, DEFAULT_MODEL, api_key="k", cache=ReplyCache(path, "v"), max_requests=3
    )
    first, _ = client().run(requests[:2])
    assert not any(isinstance(r, TeacherError) for r in first)
    second, usage = client().run(requests[2:])
    billed = server.oracle_app.completions
  assert billed == 3 and usage.requests == 1  # counted at the server
  refused = [r for r in second if isinstance(r, TeacherError)]
  assert len(refused) == 2 and all("teacher.max_requests=3 reached" in str(r) for r in refused)
