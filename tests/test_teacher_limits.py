"""Rate windows, provider headers and budgets (limits.py) on a fake clock; a budget at a server."""

import asyncio
import dataclasses

import pytest

from tailored_jax import config_lib
from tailored_jax.teacher import limits, prompts
from tailored_jax.teacher.cache import ReplyCache
from tailored_jax.teacher.client import ChatClient, ChatRequest, TeacherBudgetError
from tailored_jax.teacher.server import DEFAULT_MODEL, LocalTeacherServer
from tests.test_teacher import PROBLEM


class FakeTime:

  def __init__(self):
    self.now, self.slept = 1000.0, []

  def clock(self):
    return self.now

  async def sleep(self, seconds):
    self.slept.append(round(seconds, 6))
    self.now += seconds


def acquire_all(rate, sizes, fake, gaps=None):

  async def go():
    for i, size in enumerate(sizes):
      fake.now += (gaps or [0] * len(sizes))[i]
      await rate.acquire(size)

  asyncio.run(go())


def test_durations_as_providers_write_them():
  assert limits.parse_duration("6m0s") == 360 and limits.parse_duration("1s") == 1
  assert limits.parse_duration("20ms") == pytest.approx(0.02)
  assert limits.parse_duration("1h2m3.5s") == pytest.approx(3723.5)
  assert limits.parse_duration("2.5") == 2.5
  assert limits.parse_duration("soon") is None and limits.parse_duration(None) is None


def test_requests_per_minute_window():
  fake = FakeTime()
  rate = limits.RateLimits(requests_per_minute=2, clock=fake.clock, sleep=fake.sleep)
  acquire_all(rate, [1, 1, 1], fake, gaps=[0, 10, 5])
  assert fake.slept == [45.0]  # the third waits until the first is a minute old


def test_tokens_per_minute_window_and_settled_usage():
  fake = FakeTime()
  rate = limits.RateLimits(tokens_per_minute=100, clock=fake.clock, sleep=fake.sleep)

  async def go():
    first = await rate.acquire(80)
    rate.settle(first, 30)  # the reply used fewer tokens than estimated
    fake.now += 1
    await rate.acquire(60)  # 30 + 60 <= 100: goes at once
    fake.now += 1
    await rate.acquire(50)  # 90 + 50 > 100, and 60 + 50 still is: both must age out first

  asyncio.run(go())
  assert fake.slept == [59.0]  # at t+2, until the second (sent at t+1) is a minute old


def test_exhausted_provider_headers_pause_until_the_reset():
  fake = FakeTime()
  rate = limits.RateLimits(clock=fake.clock, sleep=fake.sleep)
  rate.observe(
      {
          "x-ratelimit-remaining-requests": "0",
          "x-ratelimit-reset-requests": "2s",
          "x-ratelimit-remaining-tokens": "5000",
          "x-ratelimit-reset-tokens": "6m0s",
      }
  )
  acquire_all(rate, [10], fake)
  assert fake.slept == [2.0]


def test_budget_stops_before_it_would_be_exceeded():
  budget = limits.Budget(max_cost=0.01, price=(1.0, 4.0))  # USD per million tokens
  spent = []
  while True:
    try:
      reservation = budget.reserve(1000, 1000)  # worst case 0.005 USD
    except limits.BudgetExceeded as e:
      assert "teacher.max_cost=0.01 USD would be exceeded" in str(e)
      break
    budget.spend(reservation, 1000, 200)  # really 0.0018 USD
    spent.append(budget.cost)
  assert len(spent) == 3 and budget.cost == pytest.approx(0.0054) and budget.cost <= 0.01
  with pytest.raises(ValueError, match="needs the model's prices"):
    limits.Budget(max_cost=1.0)
  assert config_lib.parse_prices("gpt-4o-mini=0.15/0.6, m2=1/2") == {
      "gpt-4o-mini": (0.15, 0.6),
      "m2": (1.0, 2.0),
  }


def test_a_token_budget_is_never_exceeded_at_the_server(tmp_path):
  with LocalTeacherServer(seed=1) as server:
    cache = ReplyCache(str(tmp_path / "cache.jsonl"), prompts.PROMPT_VERSION)
    client = ChatClient(
        server.url,
        DEFAULT_MODEL,
        cache=cache,
        backoff_s=0.0,
        max_total_tokens=1500,
        max_concurrency=1,
    )
    questions = [dataclasses.replace(PROBLEM, start=5 + i).question() for i in range(10)]
    requests = [
        ChatRequest(prompts.annotation_messages(q, []), n=1, max_tokens=200) for q in questions
    ]
    results, usage = client.run(requests)
    budget_errors = [r for r in results if isinstance(r, TeacherBudgetError)]
    assert server.oracle_app.completions == usage.requests == len(cache) == 10 - len(budget_errors)
    assert 0 < usage.requests < 10 and usage.tokens <= 1500
    assert "teacher.max_total_tokens=1500 would be exceeded" in str(budget_errors[0])


def test_identical_requests_in_one_batch_are_paid_once(tmp_path):
  with LocalTeacherServer(seed=1) as server:
    server.oracle_app.reply_delay_s = 0.05  # all five are in flight together
    cache = ReplyCache(str(tmp_path / "cache.jsonl"), prompts.PROMPT_VERSION)
    request = ChatRequest(prompts.annotation_messages(PROBLEM.question(), []), n=2)
    results, usage = ChatClient(server.url, DEFAULT_MODEL, cache=cache).run([request] * 5)
    assert server.oracle_app.completions == usage.requests == 1 and usage.cache_hits == 4
    assert all(r.texts == results[0].texts for r in results)


def test_the_server_never_sees_more_requests_at_once_than_max_concurrency(tmp_path):
  with LocalTeacherServer(seed=1, reply_delay_s=0.02) as server:
    questions = [dataclasses.replace(PROBLEM, start=5 + i).question() for i in range(12)]
    client = ChatClient(server.url, DEFAULT_MODEL, cache=None, max_concurrency=3)
    results, usage = client.run(
        [ChatRequest(prompts.annotation_messages(q, [])) for q in questions]
    )
    assert usage.requests == 12 and server.oracle_app.max_in_flight == 3
