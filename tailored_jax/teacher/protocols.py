"""The providers' wire formats, one class each: what one paid call sends (its body and cache key),
how its reply reads, and how calls travel in a provider batch (lines out, results back).

`OpenAIChat`: `/v1/chat/completions` (any OpenAI-compatible server), batches through `/v1/files`
and `/v1/batches`. `AnthropicMessages`: `/v1/messages` (no `n`: one call per sample; the system
prompt is a top-level field), batches through `/v1/messages/batches`.
"""

from __future__ import annotations

import dataclasses
import json
import re

from tailored_jax.teacher.cache import request_key
from tailored_jax.teacher.limits import estimate_completion_tokens, estimate_prompt_tokens

ANTHROPIC_VERSION = "2023-06-01"


@dataclasses.dataclass
class ChatRequest:
  messages: list[dict]
  n: int = 1
  temperature: float = 1.0
  max_tokens: int = 512
  # What the request is for, e.g. 'feedback_2-q17-m0': with the prompt version it names the
  # request's batch lines (their custom_id); '' where the caller has no name for it.
  tag: str = ""


@dataclasses.dataclass(frozen=True)
class Call:
  """One paid unit: the body sent and the key its reply is cached under."""

  key: str
  body: dict
  samples: int  # choices the call asks for
  sample: int = 0  # its first sample's index in the request


@dataclasses.dataclass(frozen=True)
class Reply:
  texts: list[str]
  finish_reasons: list[str]  # stop, length, content_filter
  prompt_tokens: int
  completion_tokens: int


class OpenAIChat:
  name = "openai"
  path = "/chat/completions"
  batch_list_path = "/batches"  # what the batch probe asks for
  max_batch_lines = 50_000
  max_batch_bytes = 190_000_000  # the input file's limit is 200 MB

  def headers(self, api_key: str) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}

  def calls(self, model: str, request: ChatRequest, supports_n: bool) -> list[Call]:
    body = {
        "model": model,
        "messages": request.messages,
        "n": request.n,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    if supports_n or request.n == 1:
      return [Call(request_key(body), body, request.n)]
    return [self.single(body, i) for i in range(request.n)]

  def single(self, body: dict, sample: int) -> Call:
    """Sample `sample` of a request as its own one-choice call (servers without `n`)."""
    one = dict(body, n=1, seed=sample)
    return Call(f"{request_key(one)}-{sample}", one, 1, sample)

  def read(self, body, call: Call) -> Reply:
    """Texts (a null content is ''), finish reasons and tokens (estimated without `usage`);
    ValueError without usable `choices` or with more than asked (fewer are topped up)."""
    try:
      choices = sorted(body["choices"], key=lambda c: c.get("index", 0))
      texts = [c["message"]["content"] or "" for c in choices]
      reasons = [str(c.get("finish_reason") or "stop") for c in choices]
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"no choices[].message.content: {e!r}") from e
    if not texts or len(texts) > call.samples:
      raise ValueError(f"asked for n={call.samples} choices, got {len(texts)}")
    return Reply(texts, reasons, *_tokens(self.usage(body), call, texts))

  @staticmethod
  def usage(body) -> tuple[int, int] | None:
    try:
      usage = body["usage"]
      return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (KeyError, TypeError, ValueError):
      return None

  # ---- batches: a JSONL file uploaded, then a batch created from it --------------------------
  def batch_line(self, custom_id: str, call: Call) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": call.body,
    }

  def batch_result(self, line: dict) -> tuple[str, dict | None, str]:
    """(custom_id, the reply body or None, why not): one line of an output or error file."""
    response, error = line.get("response") or {}, line.get("error")
    if error:
      return line["custom_id"], None, f"{error.get('code')}: {error.get('message')}"
    if response.get("status_code") != 200:
      message = ((response.get("body") or {}).get("error") or {}).get("message", "")
      return line["custom_id"], None, f"HTTP {response.get('status_code')}: {message}"
    return line["custom_id"], response.get("body"), ""


class AnthropicMessages:
  name = "anthropic"
  path = "/messages"
  batch_list_path = "/messages/batches"
  max_batch_lines = 100_000
  max_batch_bytes = 240_000_000  # a batch's limit is 256 MB

  def headers(self, api_key: str) -> dict:
    headers = {"anthropic-version": ANTHROPIC_VERSION}
    if api_key:
      headers["x-api-key"] = api_key
    return headers

  def calls(self, model: str, request: ChatRequest, supports_n: bool) -> list[Call]:
    system = "\n\n".join(str(m["content"]) for m in request.messages if m["role"] == "system")
    body = {
        "model": model,
        "max_tokens": request.max_tokens,
        "messages": [
            {"role": m["role"], "content": m["content"]}
            for m in request.messages
            if m["role"] != "system"
        ],
        "temperature": request.temperature,  # Anthropic's range is [0, 1]
    }
    if system:
      body["system"] = system
    key = request_key({**body, "n": 1})
    return [Call(f"{key}-{i}", body, 1, i) for i in range(request.n)]

  def single(self, body: dict, sample: int) -> Call:
    raise AssertionError("Anthropic calls are single already")

  def read(self, body, call: Call) -> Reply:
    """The text blocks joined, the stop reason as OpenAI names it, and the usage; ValueError
    when the reply is not a message."""
    try:
      if body["type"] != "message":
        raise ValueError(f"type {body['type']!r}, not 'message'")
      text = "".join(b["text"] for b in body["content"] if b.get("type") == "text")
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"no message content: {e!r}") from e
    reason = {"max_tokens": "length", "refusal": "content_filter"}.get(
        body.get("stop_reason"), "stop"
    )
    return Reply([text], [reason], *_tokens(self.usage(body), call, [text]))

  @staticmethod
  def usage(body) -> tuple[int, int] | None:
    try:
      usage = body["usage"]
      return int(usage["input_tokens"]), int(usage["output_tokens"])
    except (KeyError, TypeError, ValueError):
      return None

  def batch_line(self, custom_id: str, call: Call) -> dict:
    return {"custom_id": custom_id, "params": call.body}

  def batch_result(self, line: dict) -> tuple[str, dict | None, str]:
    result = line.get("result") or {}
    if result.get("type") == "succeeded":
      return line["custom_id"], result.get("message"), ""
    error = (result.get("error") or {}).get("error") or {}
    return line["custom_id"], None, f"{result.get('type')}: {error.get('message', '')}".strip()


PROTOCOLS = {"openai": OpenAIChat, "anthropic": AnthropicMessages}


def _tokens(reported, call: Call, texts: list[str]) -> tuple[int, int]:
  """The reply's usage, or an estimate (charged all the same) where it has none."""
  if reported is not None:
    return reported
  messages = call.body["messages"]
  if "system" in call.body:
    messages = [{"content": call.body["system"]}, *messages]
  return estimate_prompt_tokens(messages), estimate_completion_tokens(texts)


def worst_case(call: Call) -> tuple[int, int]:
  """A call's tokens at most: the prompt's estimate and every sample at max_tokens."""
  messages = call.body["messages"]
  if "system" in call.body:
    messages = [{"content": call.body["system"]}, *messages]
  return estimate_prompt_tokens(messages), call.body["max_tokens"] * call.samples


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def custom_id(prompt_version: str, tag: str, call: Call) -> str:
  """A batch line's name (≤ 64 characters of [A-Za-z0-9_-], what both providers accept): the
  prompt version, the request's tag (round, phase, question), the sample and the call's key,
  so a line can only ever be read back as the answer to the very call it was."""
  readable = _UNSAFE.sub("_", f"{prompt_version}-{tag}")
  suffix = f"s{call.sample}-{call.key[:12]}"
  return f"{readable[: 64 - len(suffix) - 1]}-{suffix}"


def parse_lines(text: str, where: str) -> list[dict]:
  """A results file's JSON lines; ValueError (naming `where` and the line) when one is cut short
  or not JSON, so a partial download is fetched again rather than half read."""
  out = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      record["custom_id"]  # noqa: B018 (every result line names its request)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{where}: line {number} is not a result line ({e})") from None
    out.append(record)
  return out
