"""The loopback teacher's batch APIs: OpenAI's (`/v1/files`, `/v1/batches`) and Anthropic's
(`/v1/messages/batches`), with the faults a client must survive.

A batch advances only when it is polled (`lines_per_poll` lines per status request; all by
default), so tests need no clock. Each line answered is billed like a sync call (the app's
`billed`). Faults, one per batch created (`faults`): 'expire_partway' (half the lines run, the
rest expire), 'errored_lines' (every other line fails, unbilled), 'partial_results' (the first
results download is cut short), 'files_deleted' (the results are gone: 404, as after the
provider's retention period).
"""

from __future__ import annotations

import datetime
import json
import time
import uuid

from aiohttp import web

FAULTS = ("expire_partway", "errored_lines", "partial_results", "files_deleted")


def _iso(t: float | None) -> str | None:
  if t is None:
    return None
  return (
      datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
  )


class _Batch:

  def __init__(self, provider: str, lines: list[dict], metadata: dict, fault: str | None):
    self.id = ("batch_" if provider == "openai" else "msgbatch_") + uuid.uuid4().hex[:24]
    self.provider, self.lines, self.metadata, self.fault = provider, lines, metadata, fault
    self.created_at = time.time()
    self.results: list[dict] = []  # one per line run (in line order)
    self.ended_at: float | None = None
    self.cancelling = False
    self.expired = False
    self.input_file_id = ""
    self.output_file_id = self.error_file_id = None
    self.downloads = 0

  @property
  def running(self) -> bool:
    return self.ended_at is None


class BatchEndpoints:
  """Routes on `app` (an OracleApp) for both providers' batches."""

  def __init__(self, app):
    self.app = app
    self.files: dict[str, dict] = {}
    self.batches: dict[str, _Batch] = {}
    self.lines_per_poll = 0  # 0: a batch runs whole at its first poll
    self.faults: list[str] = []  # for the next batches created, one each
    self.created = 0
    router = app.app.router
    router.add_post("/v1/files", self.upload)
    router.add_get("/v1/files/{id}/content", self.file_content)
    router.add_post("/v1/batches", self.openai_create)
    router.add_get("/v1/batches", self.openai_list)
    router.add_get("/v1/batches/{id}", self.openai_retrieve)
    router.add_post("/v1/batches/{id}/cancel", self.openai_cancel)
    router.add_post("/v1/messages/batches", self.anthropic_create)
    router.add_get("/v1/messages/batches", self.anthropic_list)
    router.add_get("/v1/messages/batches/{id}", self.anthropic_retrieve)
    router.add_get("/v1/messages/batches/{id}/results", self.anthropic_results)
    router.add_post("/v1/messages/batches/{id}/cancel", self.anthropic_cancel)

  # ---- running lines -------------------------------------------------------------------------
  def _advance(self, batch: _Batch) -> None:
    if not batch.running:
      return
    if batch.cancelling:
      self._end(batch)
      return
    todo = len(batch.lines) - len(batch.results)
    step = min(todo, self.lines_per_poll or todo)
    for line in batch.lines[len(batch.results) : len(batch.results) + step]:
      index = len(batch.results)
      if batch.fault == "expire_partway" and index >= len(batch.lines) // 2:
        batch.expired = True
        break
      if batch.fault == "errored_lines" and index % 2 == 1:
        batch.results.append({"custom_id": line["custom_id"], "error": "server_error"})
        continue
      batch.results.append({"custom_id": line["custom_id"], "reply": self._run(batch, line)})
    if batch.expired or len(batch.results) == len(batch.lines):
      self._end(batch)

  def _run(self, batch: _Batch, line: dict):
    if batch.provider == "openai":
      reply = self.app.chat_completion(line["body"])
    else:
      reply = self.app.anthropic_message(line["params"])
    if isinstance(reply, web.Response):  # a line the server refuses: an errored result
      return {"status": reply.status, "body": json.loads(reply.text)}
    return {"status": 200, "body": reply}

  def _end(self, batch: _Batch) -> None:
    batch.ended_at = time.time()
    if batch.provider == "openai":
      batch.output_file_id = self._file(f"{batch.id}_output.jsonl", self._openai_output(batch))
      batch.error_file_id = self._file(f"{batch.id}_errors.jsonl", self._openai_errors(batch))

  def _file(self, name: str, lines: list[dict]) -> str | None:
    if not lines:
      return None
    file_id = "file-" + uuid.uuid4().hex[:24]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    self.files[file_id] = {"filename": name, "purpose": "batch_output", "data": text.encode()}
    return file_id

  def _counts(self, batch: _Batch) -> dict:
    ok = sum(1 for r in batch.results if "reply" in r and r["reply"]["status"] == 200)
    failed = len(batch.results) - ok
    not_run = len(batch.lines) - len(batch.results)
    if batch.provider == "openai":
      expired = not_run if batch.expired else 0
      return {"total": len(batch.lines), "completed": ok, "failed": failed + expired}
    ended = not batch.running
    return {
        "processing": 0 if ended else not_run,
        "succeeded": ok,
        "errored": failed,
        "canceled": not_run if ended and batch.cancelling else 0,
        "expired": not_run if ended and not batch.cancelling else 0,
    }

  # ---- OpenAI --------------------------------------------------------------------------------
  def _openai_denied(self, request):
    return self.app._unauthorised(request)

  async def upload(self, request):
    denied = self._openai_denied(request)
    if denied:
      return denied
    form = await request.post()
    if form.get("purpose") != "batch" or not hasattr(form.get("file"), "file"):
      return self._bad("purpose 'batch' and a 'file' part are required")
    data = form["file"].file.read()
    try:
      lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
      ids = [x["custom_id"] for x in lines]
      assert all(x["method"] == "POST" and x["url"] == "/v1/chat/completions" for x in lines)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
      return self._bad("each line must be {custom_id, method: POST, url, body}")
    if len(set(ids)) != len(ids):
      return self._bad("custom_id values must be unique within a batch")
    file_id = "file-" + uuid.uuid4().hex[:24]
    self.files[file_id] = {"filename": form["file"].filename, "purpose": "batch", "data": data}
    return web.json_response(
        {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": form["file"].filename,
            "purpose": "batch",
        }
    )

  async def file_content(self, request):
    denied = self._openai_denied(request)
    if denied:
      return denied
    found = self.files.get(request.match_info["id"])
    if found is None:
      return self._missing("file", request.match_info["id"])
    data = found["data"]
    batch = next(
        (
            b
            for b in self.batches.values()
            if request.match_info["id"] in (b.output_file_id, b.error_file_id)
        ),
        None,
    )
    if batch is not None:
      cut = self._fault_download(batch)
      if cut is not None:
        return cut
      if batch.fault == "partial_results" and batch.downloads == 1:
        data = data[: len(data) // 2]
    return web.Response(body=data, content_type="application/octet-stream")

  def _fault_download(self, batch: _Batch):
    batch.downloads += 1
    if batch.fault == "files_deleted":
      return self._missing("file", batch.output_file_id or batch.id)
    return None

  async def openai_create(self, request):
    denied = self._openai_denied(request)
    if denied:
      return denied
    body = await request.json()
    file = self.files.get(body.get("input_file_id", ""))
    if file is None or file["purpose"] != "batch":
      return self._bad(f"input_file_id {body.get('input_file_id')!r} is not a batch file")
    if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
      return self._bad("endpoint must be /v1/chat/completions and completion_window 24h")
    lines = [json.loads(x) for x in file["data"].decode().splitlines() if x.strip()]
    batch = self._new("openai", lines, body.get("metadata") or {})
    batch.input_file_id = body["input_file_id"]
    return web.json_response(self._openai_view(batch))

  def _new(self, provider: str, lines: list[dict], metadata: dict) -> _Batch:
    batch = _Batch(provider, lines, metadata, self.faults.pop(0) if self.faults else None)
    self.batches[batch.id] = batch
    self.created += 1
    return batch

  def _openai_view(self, batch: _Batch) -> dict:
    if batch.running:
      status = "cancelling" if batch.cancelling else "in_progress"
    elif batch.cancelling:
      status = "cancelled"
    else:
      status = "expired" if batch.expired else "completed"
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "completed_at": None if batch.running else int(batch.ended_at),
        "request_counts": self._counts(batch),
        "metadata": batch.metadata,
    }

  def _openai_output(self, batch: _Batch) -> list[dict]:
    return [
        {
            "id": "batch_req_" + uuid.uuid4().hex[:16],
            "custom_id": r["custom_id"],
            "response": {
                "status_code": 200,
                "request_id": uuid.uuid4().hex,
                "body": r["reply"]["body"],
            },
            "error": None,
        }
        for r in batch.results
        if "reply" in r and r["reply"]["status"] == 200
    ]

  def _openai_errors(self, batch: _Batch) -> list[dict]:
    out = []
    for r in batch.results:
      if "error" in r:
        response = {"status_code": 500, "body": {"error": {"message": "The server had an error."}}}
        out.append({"custom_id": r["custom_id"], "response": response, "error": None})
      elif r["reply"]["status"] != 200:
        response = {"status_code": r["reply"]["status"], "body": r["reply"]["body"]}
        out.append({"custom_id": r["custom_id"], "response": response, "error": None})
    if batch.expired:
      for line in batch.lines[len(batch.results) :]:
        error = {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }
        out.append({"custom_id": line["custom_id"], "response": None, "error": error})
    return out

  async def openai_retrieve(self, request):
    denied = self._openai_denied(request)
    if denied:
      return denied
    batch = self.batches.get(request.match_info["id"])
    if batch is None or batch.provider != "openai":
      return self._missing("batch", request.match_info["id"])
    self._advance(batch)
    return web.json_response(self._openai_view(batch))

  async def openai_list(self, request):
    denied = self._openai_denied(request)
    if denied:
      return denied
    page = self._page("openai", request.query.get("after"), int(request.query.get("limit", 20)))
    data = [self._openai_view(b) for b in page[0]]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": page[1],
        }
    )

  def _page(self, provider: str, after: str | None, limit: int) -> tuple[list[_Batch], bool]:
    """Newest first, after the batch `after`."""
    mine = [b for b in reversed(list(self.batches.values())) if b.provider == provider]
    if after:
      ids = [b.id for b in mine]
      mine = mine[ids.index(after) + 1 :] if after in ids else []
    return mine[:limit], len(mine) > limit

  async def openai_cancel(self, request):
    denied = self._openai_denied(request)
    if denied:
      return denied
    batch = self.batches.get(request.match_info["id"])
    if batch is None or batch.provider != "openai":
      return self._missing("batch", request.match_info["id"])
    if batch.running:
      batch.cancelling = True
    return web.json_response(self._openai_view(batch))

  # ---- Anthropic -----------------------------------------------------------------------------
  async def anthropic_create(self, request):
    denied = self.app._anthropic_denied(request)
    if denied:
      return denied
    body = await request.json()
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
      return self._anthropic_bad("requests: a non-empty list of {custom_id, params}")
    ids = [r.get("custom_id") for r in requests if isinstance(r, dict)]
    if (
        len(ids) != len(requests)
        or len(set(ids)) != len(ids)
        or not all(isinstance(i, str) and 1 <= len(i) <= 64 for i in ids)
    ):
      return self._anthropic_bad("requests: each custom_id unique, 1 to 64 characters")
    return web.json_response(self._anthropic_view(self._new("anthropic", requests, {}), request))

  def _anthropic_view(self, batch: _Batch, request) -> dict:
    if batch.running:
      status = "canceling" if batch.cancelling else "in_progress"
    else:
      status = "ended"
    results_url = None
    if not batch.running:
      results_url = f"{request.scheme}://{request.host}/v1/messages/batches/{batch.id}/results"
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": self._counts(batch),
        "created_at": _iso(batch.created_at),
        "ended_at": _iso(batch.ended_at),
        "expires_at": _iso(batch.created_at + 86400),
        "cancel_initiated_at": None,
        "archived_at": None,
        "results_url": results_url,
    }

  async def anthropic_retrieve(self, request):
    denied = self.app._anthropic_denied(request)
    if denied:
      return denied
    batch = self.batches.get(request.match_info["id"])
    if batch is None or batch.provider != "anthropic":
      return self._anthropic_missing(request.match_info["id"])
    self._advance(batch)
    return web.json_response(self._anthropic_view(batch, request))

  async def anthropic_results(self, request):
    denied = self.app._anthropic_denied(request)
    if denied:
      return denied
    batch = self.batches.get(request.match_info["id"])
    if batch is None or batch.provider != "anthropic" or batch.running:
      return self._anthropic_missing(request.match_info["id"])
    batch.downloads += 1
    if batch.fault == "files_deleted":
      return self._anthropic_missing(batch.id)
    out = []
    for r in batch.results:
      if "error" in r or r["reply"]["status"] != 200:
        error = {"type": "error", "error": {"type": "api_error", "message": "Internal error"}}
        out.append({"custom_id": r["custom_id"], "result": {"type": "errored", "error": error}})
      else:
        out.append(
            {
                "custom_id": r["custom_id"],
                "result": {"type": "succeeded", "message": r["reply"]["body"]},
            }
        )
    kind = "canceled" if batch.cancelling else "expired"
    out += [
        {"custom_id": x["custom_id"], "result": {"type": kind}}
        for x in batch.lines[len(batch.results) :]
    ]
    data = "".join(json.dumps(x) + "\n" for x in out).encode()
    if batch.fault == "partial_results" and batch.downloads == 1:
      data = data[: len(data) // 2]
    return web.Response(body=data, content_type="application/binary")

  async def anthropic_list(self, request):
    denied = self.app._anthropic_denied(request)
    if denied:
      return denied
    page = self._page(
        "anthropic", request.query.get("after_id"), int(request.query.get("limit", 20))
    )
    data = [self._anthropic_view(b, request) for b in page[0]]
    return web.json_response(
        {
            "data": data,
            "has_more": page[1],
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )

  async def anthropic_cancel(self, request):
    denied = self.app._anthropic_denied(request)
    if denied:
      return denied
    batch = self.batches.get(request.match_info["id"])
    if batch is None or batch.provider != "anthropic":
      return self._anthropic_missing(request.match_info["id"])
    if batch.running:
      batch.cancelling = True
    return web.json_response(self._anthropic_view(batch, request))

  # ---- errors --------------------------------------------------------------------------------
  @staticmethod
  def _bad(message: str) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }
    return web.json_response(body, status=400)

  @staticmethod
  def _missing(kind: str, ident: str) -> web.Response:
    body = {
        "error": {
            "message": f"No such {kind}: {ident}",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    return web.json_response(body, status=404)

  @staticmethod
  def _anthropic_bad(message: str) -> web.Response:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return web.json_response(body, status=400)

  @staticmethod
  def _anthropic_missing(ident: str) -> web.Response:
    body = {
        "type": "error",
        "error": {"type": "not_found_error", "message": f"No such batch: {ident}"},
    }
    return web.json_response(body, status=404)
