"""A loopback teacher backed by the oracle, speaking the providers' documented protocols: OpenAI's
`/v1/chat/completions` (`n` choices, `usage`, `{"error": {...}}` bodies with the usual status
codes) and `/v1/models`, Anthropic's `/v1/messages`, and both batch APIs (`server_batches.py`),
so the loop talks to it through the same client as to a real API. It counts what it bills
(`billed`: calls answered, by request body). Usage counts whitespace-separated words as tokens.
Run alone with `python -m tailored_jax.teacher.server --port 8000`.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import hashlib
import json
import random
import threading
import time
import uuid
from typing import Callable

from aiohttp import web

from tailored_jax.teacher import oracle

DEFAULT_MODEL = "tailored-oracle"


def _error(
    status: int, message: str, error_type: str, code: str | None = None, param: str | None = None
) -> web.Response:
  body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
  return web.json_response(body, status=status)


def _count_tokens(text: str) -> int:
  return len(text.split())


def body_hash(body: dict) -> str:
  """A request's identity (what `billed` counts by)."""
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def anthropic_error(status: int, message: str, error_type: str) -> web.Response:
  body = {"type": "error", "error": {"type": error_type, "message": message}}
  return web.json_response(body, status=status)


class OracleApp:
  """The aiohttp application and its counters; `fail_next` injects retryable failures. `answer`
  (messages, n, rng) -> n texts replaces the synthetic oracle (e.g. `DatasetAnswers`)."""

  def __init__(
      self,
      *,
      model: str = DEFAULT_MODEL,
      api_key: str = "",
      seed: int = 0,
      error_rate: float = 0.0,
      reply_delay_s: float = 0.0,
      answer: Callable[[list[dict], int, random.Random], list[str]] | None = None,
      batch_api: bool = True,
  ):
    self.answer = answer or (
        lambda messages, n, rng: oracle.reply(messages, n, rng, self.error_rate)
    )
    self.model = model
    self.api_key = api_key
    self.seed = seed
    self.error_rate = error_rate
    self.reply_delay_s = reply_delay_s  # a slow provider's latency (tests, benchmarks)
    self.completions = 0  # replies computed (what a provider bills), faulty deliveries included
    self.billed: collections.Counter = collections.Counter()  # body_hash -> times billed
    self.in_flight = self.max_in_flight = 0  # concurrent requests being answered (tests)
    self.fail_next: list[int] = []  # statuses to answer the next requests with (tests)
    self.faults: list[str] = []  # faults for the next requests, one each (FAULTS; tests)
    self.fault_delay_s = 1.0  # how long a 'timeout' fault holds its reply
    self.app = web.Application(middlewares=[self._errors_as_json])
    self.app.router.add_post("/v1/chat/completions", self.chat_completions)
    self.app.router.add_post("/v1/messages", self.messages)
    self.app.router.add_get("/v1/models", self.models)
    if batch_api:  # else a server like vLLM's or llama.cpp's: no batch endpoints
      from tailored_jax.teacher.server_batches import BatchEndpoints  # built on this module

      self.batches = BatchEndpoints(self)

  @web.middleware
  async def _errors_as_json(self, request, handler):
    try:
      return await handler(request)
    except web.HTTPException as e:
      if e.status == 404:
        return _error(
            404,
            f"Unknown request URL: {request.method} {request.path}",
            "invalid_request_error",
            "unknown_url",
        )
      if e.status == 405:
        return _error(
            405,
            f"Method {request.method} not allowed on {request.path}",
            "invalid_request_error",
            "method_not_allowed",
        )
      raise

  def _unauthorised(self, request) -> web.Response | None:
    if not self.api_key:
      return None
    if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
      return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    return None

  async def models(self, request):
    return self._unauthorised(request) or web.json_response(
        {
            "object": "list",
            "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "tailored_jax"}
            ],
        }
    )

  async def chat_completions(self, request):
    self.in_flight += 1
    self.max_in_flight = max(self.max_in_flight, self.in_flight)
    try:
      return await self._chat_completions(request)
    finally:
      self.in_flight -= 1

  async def _chat_completions(self, request):
    denied = self._unauthorised(request)
    if denied:
      return denied
    if self.fail_next:
      status = self.fail_next.pop(0)
      return _error(
          status,
          "The server is overloaded; try again.",
          "rate_limit_error" if status == 429 else "server_error",
      )
    fault = self.faults.pop(0) if self.faults else None
    if fault in STATUS_FAULTS:
      return STATUS_FAULTS[fault](self.api_key)
    try:
      body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
      return _error(
          400, "We could not parse the JSON body of your request.", "invalid_request_error"
      )
    if self.reply_delay_s:
      await asyncio.sleep(self.reply_delay_s)
    reply = self.chat_completion(body)
    if isinstance(reply, web.Response):
      return reply
    if fault is not None:
      return await self._deliver_badly(fault, request, reply)
    return web.json_response(reply)

  def _answer(self, messages: list[dict], n: int, body: dict) -> list[str]:
    """n texts for a request, the same for the same body (ValueError: not our prompt)."""
    key = hashlib.sha256(json.dumps([self.seed, body], sort_keys=True).encode()).digest()
    return self.answer(messages, n, random.Random(key))

  def _bill(self, body: dict) -> None:
    self.completions += 1
    self.billed[body_hash(body)] += 1

  def chat_completion(self, body) -> dict | web.Response:
    """An OpenAI chat completion for `body` (billed), or the error response."""
    if not isinstance(body, dict):
      return _error(400, "The request body must be a JSON object.", "invalid_request_error")
    invalid = self._validate(body)
    if invalid:
      return invalid
    n = body.get("n", 1)
    try:
      texts = self._answer(body["messages"], n, body)
    except ValueError as e:
      return _error(
          400,
          f"The local teacher cannot answer this prompt: {e}",
          "invalid_request_error",
          param="messages",
      )
    self._bill(body)
    prompt_tokens = sum(_count_tokens(str(m.get("content", ""))) for m in body["messages"])
    completion_tokens = sum(_count_tokens(t) for t in texts)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": self.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "finish_reason": "stop",
                "logprobs": None,
            }
            for i, t in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }

  async def messages(self, request):
    """Anthropic's Messages API (x-api-key and anthropic-version headers, one text reply)."""
    denied = self._anthropic_denied(request)
    if denied:
      return denied
    if self.fail_next:
      self.fail_next.pop(0)
      return anthropic_error(529, "Overloaded", "overloaded_error")
    try:
      body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
      return anthropic_error(400, "The request body is not valid JSON.", "invalid_request_error")
    if self.reply_delay_s:
      await asyncio.sleep(self.reply_delay_s)
    reply = self.anthropic_message(body)
    return reply if isinstance(reply, web.Response) else web.json_response(reply)

  def _anthropic_denied(self, request) -> web.Response | None:
    if self.api_key and request.headers.get("x-api-key", "") != self.api_key:
      return anthropic_error(401, "invalid x-api-key", "authentication_error")
    if not request.headers.get("anthropic-version"):
      return anthropic_error(400, "anthropic-version header is required", "invalid_request_error")
    return None

  def anthropic_message(self, body) -> dict | web.Response:
    """An Anthropic message for `body` (billed), or the error response."""
    invalid = _validate_anthropic(body, self.model)
    if invalid:
      return anthropic_error(
          400 if "model:" not in invalid else 404, invalid, "invalid_request_error"
      )
    messages = list(body["messages"])
    if body.get("system"):
      messages = [{"role": "system", "content": body["system"]}, *messages]
    try:
      (text,) = self._answer(messages, 1, body)
    except ValueError as e:
      return anthropic_error(
          400, f"The local teacher cannot answer this prompt: {e}", "invalid_request_error"
      )
    self._bill(body)
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": self.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": sum(_count_tokens(str(m["content"])) for m in messages),
            "output_tokens": _count_tokens(text),
        },
    }

  async def _deliver_badly(self, fault: str, request, reply: dict) -> web.StreamResponse:
    """A computed (billed) reply delivered with one of REPLY_FAULTS."""
    if fault == "timeout":
      await asyncio.sleep(self.fault_delay_s)
      return web.json_response(reply)
    if fault == "reset":
      request.transport.close()
      return web.Response(status=200)
    if fault == "truncated":
      text = json.dumps(reply)
      return web.Response(text=text[: len(text) // 2], content_type="application/json")
    if fault == "malformed":
      return web.Response(
          text="<html><body>502 Bad Gateway</body></html>", content_type="text/html"
      )
    if fault == "no_choices":
      return web.json_response({k: v for k, v in reply.items() if k != "choices"})
    if fault == "null_content":
      for choice in reply["choices"]:
        choice["message"]["content"], choice["finish_reason"] = None, "content_filter"
    elif fault == "length":
      first = reply["choices"][0]
      first["message"]["content"] = " ".join(first["message"]["content"].split()[:4])
      first["finish_reason"] = "length"
    elif fault == "fewer_choices":
      reply["choices"] = reply["choices"][:1]
    elif fault == "no_usage":  # some servers omit it: the client charges an estimate
      del reply["usage"]
    else:
      raise ValueError(f"unknown fault {fault!r}; known: {sorted(STATUS_FAULTS)} + {REPLY_FAULTS}")
    return web.json_response(reply)

  def _validate(self, body: dict) -> web.Response | None:
    if "model" not in body:
      return _error(
          400, "you must provide a model parameter", "invalid_request_error", param="model"
      )
    if body["model"] != self.model:
      return _error(
          404,
          f"The model `{body['model']}` does not exist.",
          "invalid_request_error",
          "model_not_found",
          "model",
      )
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    ):
      return _error(
          400,
          "'messages' must be a non-empty list of {role, content} objects.",
          "invalid_request_error",
          param="messages",
      )
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
      return _error(
          400,
          f"{n!r} is not valid for 'n': it must be an integer from 1 to 128.",
          "invalid_request_error",
          param="n",
      )
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
      return _error(
          400,
          f"{temperature!r} is not valid for 'temperature': 0 to 2.",
          "invalid_request_error",
          param="temperature",
      )
    return None


def _validate_anthropic(body, model: str) -> str:
  """What is wrong with a Messages request, as Anthropic words it ('' when nothing)."""
  if not isinstance(body, dict):
    return "The request body must be a JSON object."
  if body.get("model") != model:
    return f"model: {body.get('model')!r} is not a model this server serves"
  max_tokens = body.get("max_tokens")
  if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
    return "max_tokens: Field required (an integer >= 1)"
  messages = body.get("messages")
  if (
      not isinstance(messages, list)
      or not messages
      or not all(
          isinstance(m, dict) and m.get("role") in ("user", "assistant") and "content" in m
          for m in messages
      )
  ):
    return "messages: a non-empty list of {role: user|assistant, content}"
  temperature = body.get("temperature", 1.0)
  if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1:
    return "temperature: Input should be less than or equal to 1"
  extra = set(body) - {"model", "max_tokens", "messages", "system", "temperature", "metadata"}
  if extra:
    return f"{sorted(extra)[0]}: Extra inputs are not permitted"
  return ""


def _http_date(offset_s: float) -> str:
  return email.utils.formatdate(time.time() + offset_s, usegmt=True)


# Faults answered instead of a reply (nothing billed): status, body, headers as providers send.
STATUS_FAULTS = {
    "429": lambda key: _error(429, "Rate limit reached.", "rate_limit_error"),
    "429_retry_after_seconds": lambda key: _with_header(
        _error(429, "Rate limit reached.", "rate_limit_error"), "Retry-After", "0"
    ),
    "429_retry_after_date": lambda key: _with_header(
        _error(429, "Rate limit reached.", "rate_limit_error"), "Retry-After", _http_date(-5)
    ),
    "500": lambda key: _error(500, "The server had an error.", "server_error"),
    "503": lambda key: _error(503, "The engine is overloaded.", "server_error"),
    "400": lambda key: _error(400, "Invalid request.", "invalid_request_error"),
    "401": lambda key: _error(
        401, f"Incorrect API key provided: {key}.", "invalid_request_error", "invalid_api_key"
    ),
    "403": lambda key: _error(
        403, "Your organisation may not use this model.", "invalid_request_error"
    ),
    "404": lambda key: _error(
        404, "The model does not exist.", "invalid_request_error", "model_not_found"
    ),
}
# Faults in delivering a computed (billed) reply.
REPLY_FAULTS = (
    "timeout",
    "reset",
    "truncated",
    "malformed",
    "no_choices",
    "null_content",
    "length",
    "fewer_choices",
    "no_usage",
)


def _with_header(response: web.Response, name: str, value: str) -> web.Response:
  response.headers[name] = value
  return response


class LocalTeacherServer:
  """Runs an OracleApp on 127.0.0.1 in a background thread; `url` is its `/v1` base."""

  def __init__(self, port: int = 0, **app_kwargs):
    self.oracle_app = OracleApp(**app_kwargs)
    self._port = port
    self._loop: asyncio.AbstractEventLoop | None = None
    self._runner: web.AppRunner | None = None
    self._thread: threading.Thread | None = None
    self.url = ""

  def __enter__(self) -> "LocalTeacherServer":
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  def start(self) -> str:
    started = threading.Event()
    failure: list[BaseException] = []

    def serve():
      self._loop = asyncio.new_event_loop()
      asyncio.set_event_loop(self._loop)
      try:
        self._runner = web.AppRunner(self.oracle_app.app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, backlog=4096)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
      except BaseException as e:  # reported to the starting thread
        failure.append(e)
        started.set()
        return
      started.set()
      self._loop.run_forever()
      self._loop.run_until_complete(self._runner.cleanup())
      self._loop.close()

    self._thread = threading.Thread(target=serve, name="local-teacher", daemon=True)
    self._thread.start()
    started.wait()
    if failure:
      raise RuntimeError(f"local teacher could not start on port {self._port}: {failure[0]}")
    return self.url

  def stop(self) -> None:
    if self._loop is not None and self._thread is not None:
      self._loop.call_soon_threadsafe(self._loop.stop)
      self._thread.join(timeout=10)
      self._loop = None


def main():
  import argparse

  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--api-key", default="")
  parser.add_argument("--error-rate", type=float, default=0.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  app = OracleApp(api_key=args.api_key, error_rate=args.error_rate, seed=args.seed)
  web.run_app(app.app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
  main()
