"""Provider batches (OpenAI's Batch API, Anthropic's Message Batches): half the price, within
24 hours.

`BatchSender.fill` sends the calls a phase still needs as batches and puts each reply into the
teacher cache when its batch ends; the client's ordinary pass then finds them there and sends
only what no batch answered (sync). Neither provider takes an idempotency key on create, so the
manifest (`teacher_batches.json`) records every batch before it is created and again once it
is (its id): a resumed run re-attaches to its batches (by id, or by the name in the batch's
metadata where a crash came between create and the manifest write) instead of paying twice.
Errored, expired and cancelled lines go again in a smaller batch (`retries` times), then sync; so
do all lines left at the phase's deadline (open batches are cancelled first, and what they
answered is kept).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import json
import logging
import random
import time
import uuid

import aiohttp

from tailored_jax import failpoints, preemption, storage
from tailored_jax.teacher.client import RETRYABLE_STATUS, TeacherError, error_message
from tailored_jax.teacher.limits import BudgetExceeded
from tailored_jax.teacher.protocols import Call, ChatRequest, custom_id, parse_lines, worst_case

MANIFEST_VERSION = 1
# A batch the manifest planned may be found among the provider's batches created at most this
# long before it was planned (clocks differ).
CLOCK_SLACK_S = 300.0


@dataclasses.dataclass(frozen=True)
class BatchOptions:
  poll_s: float = 60.0  # between status polls
  deadline_s: float = 24 * 3600.0  # from a phase's first batch; then stragglers go sync
  retries: int = 2  # times a failed line is batched again before it goes sync
  max_lines: int = 0  # lines per batch; 0: the provider's limit
  discount: float = 0.5  # the batch price as a fraction of the sync price


class BatchError(TeacherError):
  """A batch endpoint failed for good (bad request, auth), or the manifest is unreadable."""


class Manifest:
  """Every batch of the run: name, phase label, its lines' custom ids, state ('planned' before
  it is created, 'created' with its id, 'done' once its results are in the cache), when it was
  planned. Written whole and atomically after every change."""

  def __init__(self, path: str):
    self.path = path
    if storage.exists(path):
      try:
        data = json.loads(storage.read_text(path))
        if data.get("version") != MANIFEST_VERSION:
          raise ValueError(f"version {data.get('version')!r}, expected {MANIFEST_VERSION}")
        self.run, self.batches = data["run"], data["batches"]
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BatchError(
            f"{path}: not a teacher batch manifest ({e}); it records batches already paid "
            "for, so it is not replaced: repair it or move it aside knowingly"
        ) from None
    else:
      self.run, self.batches = uuid.uuid4().hex[:8], []

  def of(self, label: str) -> list[dict]:
    return [b for b in self.batches if b["label"] == label]

  def save(self) -> None:
    data = {"version": MANIFEST_VERSION, "run": self.run, "batches": self.batches}
    storage.write_atomically(self.path, json.dumps(data, indent=1))


class BatchSender:
  """One client run's batches: `fill` returns when every line is in the cache or left for the
  sync pass (failed `retries` times, over budget, or past the deadline)."""

  def __init__(self, client, session: aiohttp.ClientSession, usage):
    self.client, self.session, self.usage = client, session, usage
    self.protocol = client.protocol
    self.options: BatchOptions = client.batch_options or BatchOptions()
    self.cache = client.cache
    self.manifest = Manifest(client.batch_manifest)
    self.planned_here: set[str] = set()  # batch names this invocation planned
    self.held: dict[str, tuple[int, float]] = {}  # custom id -> its worst case held back
    self.over_budget = False
    self._all_lines: dict[str, Call] = {}

  # ---- the loop ------------------------------------------------------------------------------
  async def fill(self, requests: list[ChatRequest], label: str) -> None:
    label = label or "teacher"
    lines = self._all_lines = self._lines(requests, label)
    if not lines or not await self._probe():
      return
    batches = self.manifest.of(label)
    started = min((b["planned_at"] for b in batches), default=time.time())
    deadline = started + self.options.deadline_s
    for batch in batches:  # what earlier invocations' open batches will bill
      if batch["state"] != "done":
        self._hold(batch, lines, force=True)
    while not preemption.noticed():  # stopping: open batches stay in the manifest for a resume
      if time.time() < deadline:
        self._plan(lines, label)
      open_batches = [b for b in self.manifest.of(label) if b["state"] != "done"]
      if not open_batches:
        break
      for batch in open_batches:
        if batch["state"] == "planned":
          await self._create(batch, late=time.time() >= deadline)
        elif time.time() >= deadline and not batch.get("cancelled"):
          await self._cancel(batch, "the phase's deadline passed")
        else:
          await self._poll(batch, lines)
      still_open = [b for b in self.manifest.of(label) if b["state"] != "done"]
      if still_open:
        self._log_progress(label, still_open)
        await asyncio.sleep(self.options.poll_s)
    left = [cid for cid, call in lines.items() if self.cache.get(call.key) is None]
    if left:
      logging.info("teacher batches (%s): %d lines left to send synchronously", label, len(left))

  def _lines(self, requests: list[ChatRequest], label: str) -> dict[str, Call]:
    """The calls not yet answered, by custom id (identical calls once)."""
    lines, keys = {}, set()
    for i, request in enumerate(requests):
      tag = request.tag or f"{label}-{i}"
      for call in self.client.calls(request):
        if call.key in keys or self.cache.get(call.key) is not None:
          continue
        keys.add(call.key)
        lines[custom_id(self.cache.prompt_version, tag, call)] = call
    return lines

  def _plan(self, lines: dict[str, Call], label: str) -> None:
    """New batches for the lines no batch holds, not yet failed `retries` + 1 times, and whose
    worst case fits the budget; each written to the manifest before it is created."""
    batches = self.manifest.of(label)
    in_open = {cid for b in batches if b["state"] != "done" for cid in b["custom_ids"]}
    tries = collections.Counter(cid for b in batches for cid in b["custom_ids"])
    todo = []
    for cid, call in lines.items():
      if (
          cid in in_open
          or tries[cid] > self.options.retries
          or self.cache.get(call.key) is not None
      ):
        continue
      if not self._reserve(cid, call):
        break
      todo.append(cid)
    for chunk in self._chunks(todo, lines):
      name = f"tj-{self.manifest.run}-{_safe(label)}-{len(self.manifest.batches)}"
      self.manifest.batches.append(
          {
              "name": name,
              "label": label,
              "provider": self.protocol.name,
              "state": "planned",
              "planned_at": time.time(),
              "custom_ids": chunk,
          }
      )
      self.planned_here.add(name)
      self.manifest.save()
      failpoints.reached("batch_planned")

  def _chunks(self, todo: list[str], lines: dict[str, Call]) -> list[list[str]]:
    """Lines cut into batches within the provider's line and byte limits (or `max_lines`)."""
    most = self.options.max_lines or self.protocol.max_batch_lines
    chunks, size = [[]], 0
    for cid in todo:
      line_bytes = len(json.dumps(self.protocol.batch_line(cid, lines[cid]))) + 1
      if chunks[-1] and (
          len(chunks[-1]) >= most or size + line_bytes > self.protocol.max_batch_bytes
      ):
        chunks.append([])
        size = 0
      chunks[-1].append(cid)
      size += line_bytes
    return [c for c in chunks if c]

  def _reserve(self, cid: str, call: Call, force: bool = False) -> bool:
    if cid in self.held:
      return True
    try:
      self.held[cid] = self.client.budget.reserve(*worst_case(call), batch=True, force=force)
    except BudgetExceeded as e:
      if not self.over_budget:
        logging.info("teacher batches: no more lines batched: %s", e)
      self.over_budget = True
      return False
    return True

  def _hold(self, batch: dict, lines: dict[str, Call], force: bool) -> None:
    for cid in batch["custom_ids"]:
      if cid in lines:
        self._reserve(cid, lines[cid], force=force)

  def _settle(self, cid: str, billed: bool) -> None:
    """A line's held worst case let go: it was paid (`spend`/`charge` follows) or never run."""
    held = self.held.pop(cid, None)
    if held is not None:
      self.client.budget.release(held, billed=billed)

  # ---- one batch's life ----------------------------------------------------------------------
  async def _create(self, batch: dict, late: bool = False) -> None:
    """Creates a planned batch, unless an earlier invocation did (then it is re-attached) or
    the phase's deadline has passed (then its lines go sync)."""
    if batch["name"] not in self.planned_here:  # planned by a run that may have created it
      found = await self._find(batch)
      if found:
        logging.info("teacher batches: re-attached %s to %s", batch["name"], found)
        self._record_created(batch, found)
        return
    if late:
      for cid in batch["custom_ids"]:
        self._settle(cid, billed=False)
      batch["state"] = "done"
      batch["status"] = "never created: past the deadline"
      self.manifest.save()
      return
    calls = self._calls_of(batch)
    if len(calls) < len(batch["custom_ids"]):  # answered meanwhile: not sent
      batch["custom_ids"] = list(calls)
      self.manifest.save()
    body_lines = [self.protocol.batch_line(cid, call) for cid, call in calls.items()]
    if self.protocol.name == "openai":
      if not batch.get("file_id"):
        text = "".join(json.dumps(line) + "\n" for line in body_lines)
        uploaded = await self._call(
            "POST", "/files", form=(batch["name"] + ".jsonl", text.encode())
        )
        batch["file_id"] = uploaded["id"]
        self.manifest.save()
        failpoints.reached("batch_uploaded")
      created = await self._call(
          "POST",
          "/batches",
          json_body={
              "input_file_id": batch["file_id"],
              "endpoint": "/v1/chat/completions",
              "completion_window": "24h",
              "metadata": {"tailored_jax": batch["name"]},
          },
      )
    else:
      created = await self._call("POST", "/messages/batches", json_body={"requests": body_lines})
    failpoints.reached("batch_created")
    self._record_created(batch, created["id"])
    logging.info(
        "teacher batches: created %s (%s, %d lines)", created["id"], batch["name"], len(calls)
    )

  def _record_created(self, batch: dict, batch_id: str) -> None:
    batch["batch_id"], batch["state"] = batch_id, "created"
    self.manifest.save()
    failpoints.reached("batch_recorded")

  async def _find(self, batch: dict) -> str | None:
    """The provider's batch this manifest entry became, if a crash came after its create:
    OpenAI's by the name in its metadata; Anthropic's (no metadata) by its line count, created
    after it was planned and not known to the manifest (its results are then read by custom id,
    which names each call's key, so a wrong guess answers nothing)."""
    known = {b.get("batch_id") for b in self.manifest.batches}
    since = batch["planned_at"] - CLOCK_SLACK_S
    after = None
    while True:
      query = "?limit=100" + (f"&after={after}" if after and self.protocol.name == "openai" else "")
      if after and self.protocol.name == "anthropic":
        query += f"&after_id={after}"
      page = await self._call("GET", self.protocol.batch_list_path + query)
      items = page.get("data") or []
      for item in items:
        created = _timestamp(item.get("created_at"))
        if created < since or item["id"] in known:
          continue
        if self.protocol.name == "openai":
          if (item.get("metadata") or {}).get("tailored_jax") == batch["name"]:
            return item["id"]
        elif sum((item.get("request_counts") or {}).values()) == len(batch["custom_ids"]):
          return item["id"]
      oldest = min((_timestamp(i.get("created_at")) for i in items), default=0.0)
      if not page.get("has_more") or not items or oldest < since:
        return None
      after = page.get("last_id") or items[-1]["id"]

  async def _cancel(self, batch: dict, why: str) -> None:
    path = (
        f"/batches/{batch['batch_id']}/cancel"
        if self.protocol.name == "openai"
        else f"/messages/batches/{batch['batch_id']}/cancel"
    )
    logging.info("teacher batches: cancelling %s: %s", batch["batch_id"], why)
    await self._call("POST", path)
    batch["cancelled"] = True
    self.manifest.save()

  async def _poll(self, batch: dict, lines: dict[str, Call]) -> None:
    status = await self._call("GET", self._status_path(batch))
    batch["status"] = _status_word(status)
    batch["counts"] = status.get("request_counts") or {}
    if not _ended(status):
      return
    results = await self._download(batch, status)
    if results is None:
      return  # a partial download: fetched again at the next poll
    calls = self._calls_of(batch)
    seen, answered = set(), 0
    for cid, body, why in results:
      if cid not in calls or cid in seen:
        continue  # not this manifest's line (or listed twice)
      seen.add(cid)
      call = calls[cid]
      if self.cache.get(call.key) is not None:
        self._settle(cid, billed=False)
        continue
      if body is None:  # errored, expired, cancelled: not billed; batched again, or sync
        self._settle(cid, billed=False)
        batch.setdefault("failures", {})[cid] = why[:200]
        continue
      try:
        reply = self.protocol.read(body, call)
      except ValueError as e:
        self._settle(cid, billed=False)
        self.client.charge_lost(
            call, self.usage, f"bad batch result: {e}", self.protocol.usage(body), batch["batch_id"]
        )
        continue
      self._settle(cid, billed=False)
      self.client.budget.charge(reply.prompt_tokens, reply.completion_tokens, batch=True)
      self.cache.put(
          call.key,
          call.body,
          reply.texts,
          {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
          reply.finish_reasons,
          batch_id=batch["batch_id"],
      )
      self.client.prepaid[call.key] = (reply.prompt_tokens, reply.completion_tokens, True)
      answered += 1
      if answered == len(calls) // 2:
        failpoints.reached("batch_results")
    for cid, call in calls.items():  # not in the results: never run (expired, cancelled, failed)
      if cid not in seen:
        self._settle(cid, billed=False)
    self.cache.flush()
    batch["state"] = "done"
    self.manifest.save()
    failpoints.reached("batch_done")
    logging.info(
        "teacher batches: %s ended (%s): %d answered, %d to send again",
        batch["batch_id"],
        batch["status"],
        answered,
        len(calls) - answered,
    )

  async def _download(self, batch: dict, status: dict) -> list[tuple] | None:
    """The batch's result lines (custom id, reply body or None, why not); None when a download
    came back cut short (tried again at the next poll, `client.max_retries` times). Results the
    provider no longer keeps (deleted after its retention) are charged as lost at their worst
    case, since they were billed, and their lines batched again."""
    if self.protocol.name == "openai":
      paths = [
          f"/files/{status[field]}/content"
          for field in ("output_file_id", "error_file_id")
          if status.get(field)
      ]
    else:
      paths = [status["results_url"]] if status.get("results_url") else []
    results = []
    try:
      for path in paths:
        text = await self._call("GET", path, raw=True)
        results += [
            self.protocol.batch_result(line) for line in parse_lines(text, f"{batch['batch_id']}")
        ]
    except _Gone as e:
      logging.warning(
          "teacher batches: %s: results gone (%s); its lines are charged and batched again",
          batch["batch_id"],
          e,
      )
      for cid, call in self._calls_of(batch).items():
        if self.cache.get(call.key) is None:
          self._settle(cid, billed=False)
          self.client.charge_lost(call, self.usage, "batch results gone", None, batch["batch_id"])
      return []
    except ValueError as e:
      return self._partial(batch, str(e))
    listed = {r[0] for r in results}
    if _status_word(status) == "completed" and not set(batch["custom_ids"]) <= listed:
      missing = len(set(batch["custom_ids"]) - listed)
      return self._partial(batch, f"{missing} lines missing from the results")
    return results

  def _partial(self, batch: dict, why: str) -> list[tuple] | None:
    batch["download_failures"] = batch.get("download_failures", 0) + 1
    self.manifest.save()
    if batch["download_failures"] <= self.client.max_retries:
      logging.info(
          "teacher batches: %s: results incomplete (%s); fetching again", batch["batch_id"], why
      )
      return None
    raise BatchError(
        f"teacher batch {batch['batch_id']}: results incomplete after "
        f"{batch['download_failures']} downloads ({why}); its manifest entry in "
        f"{self.manifest.path} keeps the id for a later try"
    )

  def _calls_of(self, batch: dict) -> dict[str, Call]:
    lines = self._all_lines
    return {cid: lines[cid] for cid in batch["custom_ids"] if cid in lines}

  def _status_path(self, batch: dict) -> str:
    if self.protocol.name == "openai":
      return f"/batches/{batch['batch_id']}"
    return f"/messages/batches/{batch['batch_id']}"

  def _log_progress(self, label: str, batches: list[dict]) -> None:
    states = collections.Counter(b.get("status") or b["state"] for b in batches)
    counts = collections.Counter()
    for b in batches:
      counts.update({k: v for k, v in (b.get("counts") or {}).items() if isinstance(v, int)})
    logging.info(
        "teacher batches (%s): %s; lines %s",
        label,
        ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-",
    )

  # ---- HTTP ----------------------------------------------------------------------------------
  async def _probe(self) -> bool:
    """Whether the server has the batch endpoints (vLLM and llama.cpp have not): else sync."""
    url = self.client.base_url + self.protocol.batch_list_path + "?limit=1"
    try:
      async with self.session.get(url) as response:
        await response.read()
        if response.status in (404, 405, 501):
          logging.warning(
              "teacher: %s has no batch endpoints (HTTP %d); sending synchronously",
              self.client.base_url,
              response.status,
          )
          return False
    except (aiohttp.ClientError, asyncio.TimeoutError):
      pass  # the calls that follow retry and report it
    return True

  async def _call(self, method: str, path: str, json_body=None, form=None, raw: bool = False):
    """One batch-endpoint call, retried like a chat call (429/5xx, timeouts, resets); a 404 on
    a download is `_Gone`; other statuses are a BatchError naming the URL."""
    url = path if path.startswith("http") else self.client.base_url + path
    last = ""
    for attempt in range(self.client.max_retries + 1):
      data = None
      if form is not None:
        data = aiohttp.FormData()
        data.add_field("purpose", "batch")
        data.add_field("file", form[1], filename=form[0], content_type="application/jsonl")
      try:
        async with self.session.request(method, url, json=json_body, data=data) as response:
          text = await response.text()
          if response.status == 200:
            return text if raw else json.loads(text)
          message = self.client._redact(error_message(text))
          if response.status == 404 and raw:
            raise _Gone(f"HTTP 404: {message}")
          if response.status not in RETRYABLE_STATUS:
            raise BatchError(f"{method} {url}: HTTP {response.status}: {message}")
          last = f"HTTP {response.status}: {message}"
      except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        last = f"{type(e).__name__}: {e}"
      except json.JSONDecodeError as e:
        last = f"not JSON ({e})"
      if attempt < self.client.max_retries:
        await asyncio.sleep(self.client.backoff_s * (2**attempt) * (0.5 + random.random()))
    raise BatchError(f"{method} {url}: gave up after {self.client.max_retries + 1} tries: {last}")


class _Gone(Exception):
  """A batch's results the provider no longer keeps."""


def _safe(label: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in label)


def _status_word(status: dict) -> str:
  return status.get("status") or status.get("processing_status") or "?"


def _ended(status: dict) -> bool:
  return _status_word(status) in ("completed", "failed", "expired", "cancelled", "ended")


def _timestamp(value) -> float:
  """OpenAI's Unix seconds or Anthropic's RFC 3339 string, as Unix seconds (0 when absent)."""
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str):
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
  return 0.0
