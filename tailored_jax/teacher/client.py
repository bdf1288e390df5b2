"""An asyncio (aiohttp) client for a chat API: any OpenAI-compatible `/v1/chat/completions`, or
Anthropic's `/v1/messages` (`protocols.py` holds the wire formats).

Many requests run concurrently under a semaphore, within requests- and tokens-per-minute windows
and the provider's `x-ratelimit-*` headers, and within a budget in requests, tokens or money
(`limits.py`); 429/5xx/timeouts and malformed replies are retried with exponential backoff
(honouring Retry-After); every reply is cached before it is returned, so a crash never loses a
paid call. With `mode='batch'` the provider's batch API answers first (`batch.py`, half price)
and whatever it could not answer is sent here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import random
import threading
import time
from typing import Callable

import aiohttp

from tailored_jax import preemption
from tailored_jax.teacher.cache import ReplyCache, Spent
from tailored_jax.teacher.limits import Budget, BudgetExceeded, RateLimits
from tailored_jax.teacher.protocols import PROTOCOLS, Call, ChatRequest, Reply, worst_case

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}  # 529: Anthropic overloaded


class TeacherError(RuntimeError):
  """A request that failed for good (bad request, auth, retries exhausted, malformed reply)."""


class NotSent(TeacherError):
  """A request not sent because the run is stopping (a preemption signal)."""


class TeacherBudgetError(TeacherError):
  """The configured request budget would be exceeded."""


@dataclasses.dataclass
class ChatReply:
  texts: list[str]
  prompt_tokens: int
  completion_tokens: int
  cached: bool
  finish_reasons: list[str] = dataclasses.field(default_factory=list)  # per text: stop, length…


@dataclasses.dataclass
class Usage(Spent):
  """What a batch of requests cost: paid requests and tokens (`Spent`: their batch part at the
  batch price), and replies served from the cache."""

  cache_hits: int = 0
  cached_tokens: int = 0  # tokens of replies served from the cache (paid in an earlier run)
  retries: int = 0
  failures: int = 0
  charged_lost: int = 0  # attempts that may have been billed though their reply was lost

  def paid(self, prompt: int, completion: int, batch: bool = False) -> None:
    self.add(prompt, completion, batch)

  def as_dict(self) -> dict:
    return dict(dataclasses.asdict(self), tokens=self.tokens)


class ChatClient:
  """Batches chat requests to a provider (`protocol`: 'openai' for any OpenAI-compatible server,
  'anthropic'); `replay_only`: answers come from the cache alone (a recorded run), and a request
  it has no reply for fails naming the request. `mode='batch'`: the provider's batch API first
  (`batch_options`, a manifest at `batch_manifest`)."""

  def __init__(
      self,
      base_url: str,
      model: str,
      *,
      api_key: str = "",
      cache: ReplyCache | None,
      max_concurrency: int = 16,
      max_retries: int = 5,
      timeout_s: float = 120.0,
      backoff_s: float = 1.0,
      requests_per_minute: float = 0.0,
      supports_n: bool = True,
      max_requests: int = 0,
      connect_timeout_s: float = 10.0,
      replay_only: bool = False,
      tokens_per_minute: float = 0.0,
      max_total_tokens: int = 0,
      max_cost: float = 0.0,
      price: tuple[float, float] | None = None,
      protocol: str = "openai",
      mode: str = "sync",
      batch_options=None,
      batch_manifest: str = "",
  ):
    if replay_only and cache is None:
      raise ValueError("a replaying client needs the recording as its cache")
    if mode == "batch" and (cache is None or not batch_manifest):
      raise ValueError("batch mode needs a reply cache and a manifest path")
    self.replay_only = replay_only
    self.protocol = PROTOCOLS[protocol]()
    self.base_url = base_url.rstrip("/")
    self.url = self.base_url + self.protocol.path
    self.model = model
    self.api_key = api_key
    self.cache = cache
    self.max_concurrency = max_concurrency
    self.max_retries = max_retries
    self.timeout_s = timeout_s
    self.connect_timeout_s = min(connect_timeout_s, timeout_s)
    self.backoff_s = backoff_s
    self.supports_n = supports_n
    self.mode = "sync" if replay_only else mode
    self.batch_options = batch_options
    self.batch_manifest = batch_manifest
    # Calls paid ahead of the run that uses them (by a batch, or a stream during the exam):
    # cache key -> (prompt, completion tokens, batch); counted as paid when the run reads them.
    self.prepaid: dict[str, tuple[int, int, bool]] = {}
    discount = batch_options.discount if batch_options is not None else 0.5
    self.budget = Budget(max_requests, max_total_tokens, max_cost, price, discount)  # the run's
    if cache is not None and not replay_only:
      spent = cache.spent()
      self.budget.carry(spent)
      if spent.requests:
        logging.info(
            "teacher budget: %d requests, %d tokens already spent by this run (%s)",
            spent.requests,
            spent.tokens,
            cache.path,
        )
    self.limits = RateLimits(requests_per_minute, tokens_per_minute)  # over the client's life

  def calls(self, request: ChatRequest) -> list[Call]:
    return self.protocol.calls(self.model, request, self.supports_n)

  def run(
      self,
      requests: list[ChatRequest],
      on_reply: Callable[[int, ChatReply], None] | None = None,
      label: str = "",
  ) -> tuple[list[ChatReply | TeacherError], Usage]:
    """Sends all requests (cache first); results in request order, failures as TeacherError.
    `label` names the phase (its batches and their deadline)."""
    try:
      return asyncio.run(self._run(requests, on_reply, label))
    finally:  # the replies paid for are stored before anything relies on them
      if self.cache is not None:
        self.cache.flush()

  def stream(self, max_pending: int = 0) -> "Stream":
    """Requests sent as they are known (a background event loop), their replies cached as they
    arrive; `max_pending` submitted but unanswered at most (0: 4 × max_concurrency), beyond
    which `submit` waits."""
    return Stream(self, max_pending or 4 * self.max_concurrency)

  def session(self) -> aiohttp.ClientSession:
    """A session whose pool holds a connection for every request the semaphore lets through,
    so no request waits for one; the timeouts then cover one attempt on the wire only (connect,
    first byte / each read, total), never time spent queued here. A timeout that started while
    a request was still queued would abandon and re-send requests the server is serving."""
    headers = self.protocol.headers(self.api_key)  # a JSON body sets its own Content-Type
    connector = aiohttp.TCPConnector(
        limit=self.max_concurrency, limit_per_host=self.max_concurrency
    )
    timeout = aiohttp.ClientTimeout(
        total=self.timeout_s,
        connect=self.connect_timeout_s,
        sock_connect=self.connect_timeout_s,
        sock_read=self.timeout_s,
    )
    return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)

  async def _run(self, requests, on_reply, label):
    usage = Usage()
    results: list[ChatReply | TeacherError | None] = [None] * len(requests)
    semaphore = asyncio.Semaphore(self.max_concurrency)
    limits = self.limits
    limits.lock = asyncio.Lock()  # a lock belongs to one event loop; the windows carry over
    in_flight: dict[str, asyncio.Future] = {}  # identical requests of a batch are sent once
    async with self.session() as session:
      if self.mode == "batch":
        from tailored_jax.teacher.batch import BatchSender  # a leaf of this module

        await BatchSender(self, session, usage).fill(requests, label)

      async def one(i: int, request: ChatRequest):
        try:
          reply = await self._complete(session, request, semaphore, limits, usage, in_flight)
        except NotSent as e:
          results[i] = e
          return
        except TeacherError as e:
          usage.failures += 1
          results[i] = e
          return
        results[i] = reply
        if on_reply is not None:
          on_reply(i, reply)

      await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    unsent = sum(isinstance(r, NotSent) for r in results)
    if unsent:  # every reply that was sent has arrived and is cached
      raise preemption.Preempted(
          f"during the teacher phase: {len(requests) - unsent} of {len(requests)} requests"
          f" answered and cached, {unsent} not sent"
      )
    return results, usage

  async def _complete(
      self,
      session,
      request,
      semaphore,
      limits: RateLimits,
      usage,
      in_flight: dict[str, asyncio.Future],
      prepay: bool = False,
  ) -> ChatReply:
    """A request's reply (its calls from the cache or paid); `prepay`: what is paid is counted
    by the run that later reads it from the cache (`prepaid`), not in `usage`."""
    calls = self.calls(request)
    texts, reasons, prompt_tokens, completion_tokens, all_cached = [], [], 0, 0, True
    while calls:
      call = calls.pop(0)
      key = call.key
      entry = self.cache.get(key) if self.cache is not None else None
      if entry is None and key in in_flight:  # the same request is being paid for: share it
        entry = await asyncio.shield(in_flight[key])
      if entry is not None:
        if key in self.prepaid:  # paid ahead for this run (a batch, a stream): paid here
          usage.paid(*self.prepaid.pop(key))
          all_cached = False
        else:
          usage.cache_hits += 1
          recorded = entry.get("usage") or {}
          usage.cached_tokens += int(recorded.get("prompt_tokens", 0)) + int(
              recorded.get("completion_tokens", 0)
          )
        got = entry["texts"]
        got_reasons = entry.get("finish_reasons") or ["stop"] * len(got)
      else:
        all_cached = False
        if self.replay_only:
          question = request.messages[-1].get("content", "") if request.messages else ""
          raise TeacherError(
              f"replay: {self.cache.path} has no reply for request {key[:16]} (model "
              f"{self.model!r}, n={call.samples}, temperature {request.temperature}; last "
              f"message ends {question[-120:]!r})"
          )
        estimate, worst_completion = worst_case(call)
        try:
          reservation = self.budget.reserve(estimate, worst_completion)
        except BudgetExceeded as e:
          raise TeacherBudgetError(f"{e}; raise it to continue (replies received are kept)")
        shared = in_flight[key] = asyncio.get_running_loop().create_future()
        try:
          async with semaphore:
            if preemption.noticed():  # stopping: what is in flight finishes, nothing new goes
              raise NotSent("not sent: the run is stopping")
            window = await limits.acquire(estimate + worst_completion)
            reply = await self._post_with_retries(session, call, usage, limits)
        except TeacherError as e:
          self.budget.release(reservation)
          shared.set_exception(e)
          shared.exception()  # retrieved: requests sharing it fail with it, or nobody waits
          raise
        finally:
          in_flight.pop(key, None)
        got, got_reasons = reply.texts, reply.finish_reasons
        p_tok, c_tok = reply.prompt_tokens, reply.completion_tokens
        shared.set_result(
            {
                "texts": got,
                "finish_reasons": got_reasons,
                "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok},
            }
        )
        limits.settle(window, p_tok + c_tok)
        self.budget.spend(reservation, p_tok, c_tok)
        if prepay:
          self.prepaid[key] = (p_tok, c_tok, False)
        else:
          usage.paid(p_tok, c_tok)
        prompt_tokens += p_tok
        completion_tokens += c_tok
        if self.cache is not None:
          self.cache.put(
              key,
              call.body,
              got,
              {"prompt_tokens": p_tok, "completion_tokens": c_tok},
              got_reasons,
          )
      if len(got) < call.samples:  # a server that ignored `n`: the rest one by one, cached apart
        logging.info(
            "teacher request %s: %d of n=%d choices; asking for the rest singly",
            key[:12],
            len(got),
            call.samples,
        )
        calls += [self.protocol.single(call.body, i) for i in range(len(got), call.samples)]
      texts.extend(got)
      reasons.extend(got_reasons)
    return ChatReply(texts, prompt_tokens, completion_tokens, all_cached, reasons)

  def _redact(self, text: str) -> str:
    """A server message with the API key (some echo it) masked: it never reaches a log."""
    return text.replace(self.api_key, "***") if self.api_key else text

  async def _post_with_retries(self, session, call: Call, usage, limits: RateLimits) -> Reply:
    """One call until it succeeds or fails for good: 408/409/429/5xx/529, timeouts, resets, and
    200 replies that are not JSON or lack the reply's content are retried with backoff
    (Retry-After in seconds or as an HTTP date honoured); other statuses are not. Errors name
    the call by its cache key, never the API key."""
    key = call.key
    last_error = ""
    for attempt in range(self.max_retries + 1):
      delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
      try:
        async with session.post(self.url, json=call.body) as response:
          text = await response.text()
          limits.observe(response.headers)
          if response.status == 200:
            body = None
            try:
              body = json.loads(text)
              return self.protocol.read(body, call)
            except ValueError as e:
              last_error = f"malformed reply ({self._redact(str(e))}): {self._redact(text[:120])!r}"
              self.charge_lost(call, usage, "malformed reply", self.protocol.usage(body))
          else:
            message = self._redact(error_message(text))
            if response.status not in RETRYABLE_STATUS:
              raise TeacherError(
                  f"{self.url}: HTTP {response.status} for request {key[:16]}: {message}"
              )
            last_error = f"HTTP {response.status}: {message}"
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            if wait is not None:
              delay = max(delay, wait)
      except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        last_error = self._redact(f"{type(e).__name__}: {e}")
        if not isinstance(e, NOT_SENT):  # sent: the provider may have billed a reply we lost
          self.charge_lost(call, usage, type(e).__name__, None)
      if attempt < self.max_retries:
        usage.retries += 1
        delay = max(delay, limits.not_before - time.monotonic())
        logging.info(
            "teacher request %s failed (%s); retry %d/%d in %.1fs",
            key[:16],
            last_error,
            attempt + 1,
            self.max_retries,
            delay,
        )
        await asyncio.sleep(delay)
    raise TeacherError(
        f"{self.url}: request {key[:16]}: gave up after {self.max_retries + 1} "
        f"attempts: {last_error}"
    )

  def charge_lost(self, call: Call, usage, reason: str, reported, batch_id: str = "") -> None:
    """An attempt whose reply was lost after it was sent, charged to the run's budget (and
    recorded in the cache, so a resume counts it): by the usage the reply reported, else the
    call's worst case."""
    if reported is None:
      reported = worst_case(call)
    self.budget.charge(*reported, batch=bool(batch_id))
    usage.charged_lost += 1
    if self.cache is not None:
      self.cache.charge(call.key, reason, *reported, batch_id=batch_id)


class Stream:
  """A client's requests sent while the caller goes on (e.g. the exam keeps decoding): an event
  loop in a thread, the client's concurrency limit and rate windows, a bounded number of
  requests pending (back-pressure on `submit`). What it pays is counted by the client's next
  `run` that reads it (`prepaid`); failures are left for that run to retry."""

  def __init__(self, client: ChatClient, max_pending: int):
    self.client = client
    self.usage = Usage()
    self.loop = asyncio.new_event_loop()
    self.thread = threading.Thread(target=self.loop.run_forever, name="teacher-stream", daemon=True)
    self.thread.start()
    self.slots = threading.BoundedSemaphore(max_pending)
    self.futures: list = []
    self.failed: list[TeacherError] = []
    self.session = asyncio.run_coroutine_threadsafe(self._open(), self.loop).result()

  async def _open(self):
    self.semaphore = asyncio.Semaphore(self.client.max_concurrency)
    self.client.limits.lock = asyncio.Lock()
    self.in_flight: dict[str, asyncio.Future] = {}
    return self.client.session()

  async def _one(self, request: ChatRequest) -> None:
    try:
      await self.client._complete(
          self.session,
          request,
          self.semaphore,
          self.client.limits,
          self.usage,
          self.in_flight,
          prepay=True,
      )
    except TeacherError as e:  # NotSent included: the run that reads it tries again
      self.failed.append(e)

  def submit(self, request: ChatRequest) -> None:
    self.slots.acquire()
    future = asyncio.run_coroutine_threadsafe(self._one(request), self.loop)
    future.add_done_callback(lambda _: self.slots.release())
    self.futures.append(future)

  def close(self) -> None:
    """Waits for every submitted request (answered and cached, or failed), then stops."""
    try:
      for future in self.futures:
        future.result()
    finally:
      asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result()
      self.loop.call_soon_threadsafe(self.loop.stop)
      self.thread.join()
      self.loop.close()
      if self.client.cache is not None:
        self.client.cache.flush()
    if self.failed:
      logging.info(
          "teacher stream: %d of %d requests failed (%s); they are tried again",
          len(self.failed),
          len(self.futures),
          self.failed[0],
      )


# Failures before the request left: nothing can have been billed.
NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
  """A Retry-After header as seconds to wait: delta-seconds or an HTTP date (RFC 9110)."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  now = time.time() if now is None else now
  return max(0.0, when.timestamp() - now)


def error_message(text: str) -> str:
  """The message of an error body (OpenAI's and Anthropic's `error.message`), else its start."""
  try:
    return json.loads(text)["error"]["message"]
  except (ValueError, KeyError, TypeError):
    return text[:300]
