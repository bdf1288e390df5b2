"""What the client may send and when: requests- and tokens-per-minute windows, the provider's own
`x-ratelimit-*` headers, and a budget in requests, tokens or money that is never exceeded (a
request is sent only if its worst case still fits)."""

from __future__ import annotations

import asyncio
import collections
import re
import time
from typing import Awaitable, Callable

from tailored_jax.config_lib import cost_usd

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
  """`x-ratelimit-reset-*` values as seconds: '6m0s', '1s', '20ms', '1h2m3.5s', or plain seconds."""
  if not text:
    return None
  text = text.strip()
  try:
    return max(0.0, float(text))
  except ValueError:
    pass
  parts = _DURATION.findall(text)
  if not parts or "".join(n + u for n, u in parts) != text:
    return None
  scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
  return sum(float(n) * scale[u] for n, u in parts)


def estimate_prompt_tokens(messages: list[dict]) -> int:
  """A provider-independent upper-ish estimate: a token per 3 characters (English runs about 4
  with OpenAI's and LLaMA's tokenizers), plus 4 per message and 3 for the reply's framing."""
  return sum(len(str(m.get("content", ""))) // 3 + 4 for m in messages) + 3


class RateLimits:
  """Requests and tokens per minute over a sliding window, and pauses the provider asks for."""

  def __init__(
      self,
      requests_per_minute: float = 0.0,
      tokens_per_minute: float = 0.0,
      window_s: float = 60.0,
      clock: Callable[[], float] = time.monotonic,
      sleep: Callable[[float], Awaitable] = asyncio.sleep,
  ):
    self.rpm, self.tpm, self.window_s = requests_per_minute, tokens_per_minute, window_s
    self.clock, self.sleep = clock, sleep
    self.sent: collections.deque = collections.deque()  # [time, tokens] per request in window
    self.not_before = 0.0
    self.lock = asyncio.Lock()

  def _wait_needed(self, tokens: int) -> float:
    now = self.clock()
    while self.sent and self.sent[0][0] <= now - self.window_s:
      self.sent.popleft()
    wait = max(0.0, self.not_before - now)
    if self.rpm and len(self.sent) >= self.rpm:
      wait = max(wait, self.sent[0][0] + self.window_s - now)
    if self.tpm and self.sent:
      used = sum(t for _, t in self.sent)
      if used + tokens > self.tpm:
        # wait until enough of the window's oldest requests have aged out
        freed, at = used + tokens - self.tpm, self.sent[0][0]
        for when, spent in self.sent:
          freed -= spent
          at = when
          if freed <= 0:
            break
        wait = max(wait, at + self.window_s - now)
    return wait

  async def acquire(self, tokens: int) -> list:
    """Waits until a request of about `tokens` tokens may go; returns its window entry."""
    async with self.lock:
      while True:
        wait = self._wait_needed(tokens)
        if wait <= 0:
          break
        await self.sleep(wait)
      entry = [self.clock(), tokens]
      self.sent.append(entry)
      return entry

  def settle(self, entry: list, tokens: int) -> None:
    """The request's real token count (from the reply's usage) replaces the estimate."""
    entry[1] = tokens

  def observe(self, headers) -> None:
    """OpenAI-style `x-ratelimit-remaining-*` / `x-ratelimit-reset-*`: when none are left, no
    request goes before the reset."""
    for kind in ("requests", "tokens"):
      remaining = headers.get(f"x-ratelimit-remaining-{kind}")
      reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
      try:
        exhausted = remaining is not None and float(remaining) <= 0
      except ValueError:
        exhausted = False
      if exhausted and reset is not None:
        self.not_before = max(self.not_before, self.clock() + reset)


class BudgetExceeded(Exception):
  """The next request's worst case would exceed a budget (the caller raises TeacherBudgetError)."""


def estimate_completion_tokens(texts: list[str]) -> int:
  """What a reply without `usage` is charged for its texts (the prompt estimate's rate)."""
  return sum(len(t) // 3 + 1 for t in texts)


class Budget:
  """Caps in requests, tokens and money over the run: what earlier invocations spent is carried
  in (`carry`, from the teacher cache). A request is let through only if its worst case
  (estimated prompt + max_tokens × n) fits what is left; spending is corrected to the reply's
  usage, and an attempt that may have been billed without its reply arriving is `charge`d.
  Batch calls (`batch=True`) cost `batch_discount` times the price."""

  def __init__(
      self,
      max_requests: int = 0,
      max_tokens: int = 0,
      max_cost: float = 0.0,
      price: tuple[float, float] | None = None,
      batch_discount: float = 0.5,
  ):
    self.max_requests, self.max_tokens, self.max_cost = max_requests, max_tokens, max_cost
    self.price = price
    self.batch_discount = batch_discount
    self.requests = self.tokens = 0
    self.cost = 0.0
    self.reserved_tokens = 0
    self.reserved_cost = 0.0
    if max_cost and price is None:
      raise ValueError("teacher.max_cost needs the model's prices (teacher.prices)")

  def _cost(self, prompt: int, completion: int, batch: bool = False) -> float:
    if self.price is None:
      return 0.0
    return cost_usd(self.price, prompt, completion) * (self.batch_discount if batch else 1.0)

  def reserve(
      self, prompt_estimate: int, completion_max: int, batch: bool = False, force: bool = False
  ) -> tuple[int, float]:
    """Holds a call's worst case back; BudgetExceeded if it does not fit (`force`: a call
    already sent, in a batch an earlier invocation created, is held back regardless)."""
    worst_tokens = prompt_estimate + completion_max
    worst_cost = self._cost(prompt_estimate, completion_max, batch)
    if not force:
      if self.max_requests and self.requests >= self.max_requests:
        raise BudgetExceeded(f"teacher.max_requests={self.max_requests} reached")
      if self.max_tokens and self.tokens + self.reserved_tokens + worst_tokens > self.max_tokens:
        raise BudgetExceeded(
            f"teacher.max_total_tokens={self.max_tokens} would be exceeded "
            f"({self.tokens} spent, next request up to {worst_tokens})"
        )
      if self.max_cost and self.cost + self.reserved_cost + worst_cost > self.max_cost:
        raise BudgetExceeded(
            f"teacher.max_cost={self.max_cost:g} USD would be exceeded "
            f"({self.cost:.4f} spent, next request up to {worst_cost:.4f})"
        )
    self.requests += 1
    self.reserved_tokens += worst_tokens
    self.reserved_cost += worst_cost
    return worst_tokens, worst_cost

  def spend(
      self, reservation: tuple[int, float], prompt: int, completion: int, batch: bool = False
  ) -> None:
    self.reserved_tokens -= reservation[0]
    self.reserved_cost -= reservation[1]
    self.tokens += prompt + completion
    self.cost += self._cost(prompt, completion, batch)

  def carry(self, spent) -> None:
    """What earlier invocations of this run spent (a `cache.Spent`), counted against the caps."""
    batch_prompt, batch_completion = spent.batch_prompt_tokens, spent.batch_completion_tokens
    self.requests += spent.requests
    self.tokens += spent.tokens
    self.cost += self._cost(
        spent.prompt_tokens - batch_prompt, spent.completion_tokens - batch_completion
    ) + self._cost(batch_prompt, batch_completion, batch=True)

  def charge(self, prompt: int, completion: int, batch: bool = False) -> None:
    """An attempt billed (or possibly billed) whose reply was lost: one more request spent."""
    self.requests += 1
    self.tokens += prompt + completion
    self.cost += self._cost(prompt, completion, batch)

  def release(self, reservation: tuple[int, float], billed: bool = True) -> None:
    """A call that failed for good: its worst case no longer held back. `billed=False`: the
    provider says it was never run (an errored or expired batch line), so it is no request."""
    self.reserved_tokens -= reservation[0]
    self.reserved_cost -= reservation[1]
    if not billed:
      self.requests -= 1
