"""`python -m tailored_jax.teacher --requests=IN.jsonl --results=OUT.jsonl --base-url=URL
--model=NAME [--protocol=anthropic] [--mode=batch] [--rpm --tpm --max-cost --prices ...]`:
annotate a dataset with a teacher, no more.

IN.jsonl holds one request per line: `{"id": ..., "messages": [...]}` or `{"id": ..., "prompt":
"..."}`, optionally with `n`, `temperature`, `max_tokens`. Each finished request is appended to
OUT.jsonl as `{"id", "texts", "finish_reasons", "usage"}` (or `{"id", "error"}`) as it arrives;
every paid reply is first kept in OUT.jsonl.cache.jsonl, so a killed run re-run with the same
command pays for nothing twice and retries only what failed. That cache is also a recording
`teacher.kind=replay` can answer from. With --mode=batch the provider's batch API answers first
(half the price; its manifest, OUT.jsonl.batches.json, lets a killed run re-attach to its
batches). The API key is read from the environment variable named by --api-key-env (default:
the protocol's) and never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tailored_jax import workdir as wd
from tailored_jax.progress import Progress
from tailored_jax.config_lib import PROVIDER_DEFAULTS, parse_prices
from tailored_jax.teacher.batch import BatchOptions
from tailored_jax.teacher.cache import ReplyCache
from tailored_jax.teacher.client import ChatClient, ChatRequest, TeacherError

CACHE_VERSION = "batch-1"


def read_requests(path: str, defaults: dict) -> list[tuple[str, ChatRequest]]:
  """(id, request) per line; errors name the file, line and field."""
  out, seen = [], set()
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
      if not isinstance(record, dict) or "id" not in record:
        raise ValueError(f"{where}: each line needs an 'id'")
      rid = str(record["id"])
      if rid in seen:
        raise ValueError(f"{where}: id {rid!r} repeats an earlier line")
      seen.add(rid)
      messages = record.get("messages")
      if messages is None and isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
      if not (
          isinstance(messages, list)
          and messages
          and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
      ):
        raise ValueError(
            f"{where}: field 'messages' must be a list of {{role, content}} (or give 'prompt')"
        )
      options = {k: record.get(k, defaults[k]) for k in ("n", "temperature", "max_tokens")}
      out.append((rid, ChatRequest(messages, **options, tag=rid)))
  return out


def finished_ids(path: str) -> set[str]:
  """Ids already answered in a results file (failed ones are tried again)."""
  if not os.path.exists(path):
    return set()
  done = set()
  for record in wd.read_jsonl(path):
    if "texts" in record:
      done.add(str(record["id"]))
  return done


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--requests", required=True)
  parser.add_argument("--results", required=True)
  parser.add_argument("--base-url", required=True)
  parser.add_argument("--model", required=True)
  parser.add_argument("--api-key-env", default="", help="default: the protocol's own")
  parser.add_argument("--protocol", choices=("openai", "anthropic"), default="openai")
  parser.add_argument("--mode", choices=("sync", "batch"), default="sync")
  parser.add_argument("--batch-poll-s", type=float, default=60.0)
  parser.add_argument("--batch-deadline-h", type=float, default=24.0)
  parser.add_argument("--batch-retries", type=int, default=2)
  parser.add_argument("--n", type=int, default=1)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--max-tokens", type=int, default=512)
  parser.add_argument("--max-concurrency", type=int, default=16)
  parser.add_argument("--max-retries", type=int, default=6)
  parser.add_argument("--timeout-s", type=float, default=120.0)
  parser.add_argument("--rpm", type=float, default=0.0, help="requests per minute (0: off)")
  parser.add_argument("--tpm", type=float, default=0.0, help="tokens per minute (0: off)")
  parser.add_argument("--max-requests", type=int, default=0)
  parser.add_argument("--max-tokens-total", type=int, default=0)
  parser.add_argument("--max-cost", type=float, default=0.0, help="USD; needs --prices")
  parser.add_argument("--prices", default="", help="MODEL=IN/OUT USD per million tokens, ...")
  parser.add_argument("--no-n", action="store_true", help="the server ignores n (Ollama)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  try:
    todo = read_requests(
        args.requests, {"n": args.n, "temperature": args.temperature, "max_tokens": args.max_tokens}
    )
    price = parse_prices(args.prices).get(args.model)
    if args.max_cost and price is None:
      raise ValueError(f"--max-cost needs the price of {args.model!r} in --prices")
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  done = finished_ids(args.results)
  todo = [(rid, request) for rid, request in todo if rid not in done]
  logging.info(
      "%d requests to send (%d already answered in %s)", len(todo), len(done), args.results
  )
  cache = ReplyCache(args.results + ".cache.jsonl", CACHE_VERSION)
  client = ChatClient(
      args.base_url,
      args.model,
      api_key=os.environ.get(args.api_key_env or PROVIDER_DEFAULTS[args.protocol][1], ""),
      cache=cache,
      max_concurrency=args.max_concurrency,
      max_retries=args.max_retries,
      timeout_s=args.timeout_s,
      requests_per_minute=args.rpm,
      tokens_per_minute=args.tpm,
      supports_n=not args.no_n,
      max_requests=args.max_requests,
      max_total_tokens=args.max_tokens_total,
      max_cost=args.max_cost,
      price=price,
      protocol=args.protocol,
      mode=args.mode,
      batch_options=BatchOptions(
          poll_s=args.batch_poll_s,
          deadline_s=args.batch_deadline_h * 3600,
          retries=args.batch_retries,
      ),
      batch_manifest=args.results + ".batches.json",
  )
  failed = [0]
  os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
  with open(args.results, "a") as out, Progress("teacher", len(todo), "requests") as progress:

    def write(record: dict) -> None:
      out.write(json.dumps(record) + "\n")
      out.flush()
      os.fsync(out.fileno())

    def on_reply(i, reply):
      write(
          {
              "id": todo[i][0],
              "texts": reply.texts,
              "finish_reasons": reply.finish_reasons,
              "usage": {
                  "prompt_tokens": reply.prompt_tokens,
                  "completion_tokens": reply.completion_tokens,
              },
              "cached": reply.cached,
          }
      )
      progress.update(
          1, failed=failed[0], tokens=client.budget.tokens, cost=f"{client.budget.cost:.4f}"
      )

    results, usage = client.run(
        [request for _, request in todo], on_reply=on_reply, label="teacher"
    )
    for (rid, _), result in zip(todo, results):
      if isinstance(result, TeacherError):
        failed[0] += 1
        write({"id": rid, "error": str(result)})
  logging.info(
      "done: %d answered (%d from the cache), %d failed; %d paid requests (%d in batches), %d "
      "tokens%s",
      len(todo) - failed[0],
      usage.cache_hits,
      failed[0],
      usage.requests,
      usage.batch_requests,
      usage.tokens,
      f", {client.budget.cost:.4f} USD" if price else "",
  )
  return 1 if failed[0] else 0


if __name__ == "__main__":
  sys.exit(main())
