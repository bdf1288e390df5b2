"""Two processes (2 CPU devices each, gloo collectives) run one round on a shared workdir and
get exactly what one process with the same 4-device mesh gets."""

import json
import os
import socket
import subprocess
import sys

from tailored_jax import rounds
from tests.processes import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = r"""
import os, sys
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
assert jax.process_count() == 2 and jax.device_count() == 4
sys.path.insert(0, sys.argv[4])
from tests.test_rounds import tiny_config
from tailored_jax import rounds
if os.environ.get("TEST_DEVICE_BUDGET_BYTES"):  # this machine has less free memory than the rest
  from tailored_jax.sample import memory
  memory.device_budget_bytes = lambda fraction=0.5: int(os.environ["TEST_DEVICE_BUDGET_BYTES"])
cfg = tiny_config()
cfg.rounds = int(sys.argv[6])
cfg.mesh.num_devices = 0
cfg.teacher.max_requests = int(sys.argv[5])
if os.environ.get("TEST_SIGTERM_AT_DECODE"):  # this process is told to stop, at its Nth decode
  import signal
  from tailored_jax.sample import decode
  calls = [0]
  def stopping(real):  # static batches call the decoder, continuous slots advance
    def decode_then_stop(self, *args, **kwargs):
      calls[0] += 1
      if calls[0] == int(os.environ["TEST_SIGTERM_AT_DECODE"]):
        os.kill(os.getpid(), signal.SIGTERM)
      return real(self, *args, **kwargs)
    return decode_then_stop
  decode.Decoder.__call__ = stopping(decode.Decoder.__call__)
  decode.Decoder.advance = stopping(decode.Decoder.advance)
from tailored_jax import preemption
preemption.install(jax.process_count())
rounds.run(cfg, sys.argv[3])
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read(workdir, *parts):
  with open(os.path.join(workdir, *parts)) as f:
    return f.read()


def run_two(
    workdir: str, max_requests: int = 0, rounds: int = 2, process_1_env: dict | None = None
) -> list[tuple[int, str]]:
  """Both processes' (exit code, output); `process_1_env` changes process 1's machine."""
  address = f"127.0.0.1:{free_port()}"
  env = child_env()
  workers = [
      subprocess.Popen(
          [sys.executable, "-c", WORKER, address, str(i), workdir, ROOT, str(max_requests)]
          + [str(rounds)],
          env=dict(env, **(process_1_env or {})) if i == 1 else env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  try:
    outputs = [w.communicate(timeout=300)[0] for w in workers]
  finally:  # a hung collective must not leave workers behind the test
    for w in workers:
      w.kill()
  return [(w.returncode, out) for w, out in zip(workers, outputs)]


def test_a_failure_on_process_0_stops_every_process(tmp_path):
  (rc0, out0), (rc1, out1) = run_two(str(tmp_path / "w"), max_requests=3)
  assert rc0 != 0 and "teacher.max_requests=3 reached" in out0
  assert rc1 != 0 and "phase annotate failed on process 0" in out1


def test_two_processes_match_one(tmp_path):
  from tests.test_rounds import tiny_config

  shared = str(tmp_path / "shared")
  for rc, out in run_two(shared):
    assert rc == 0, out[-3000:]
  cfg = tiny_config()
  cfg.rounds = 2
  cfg.mesh.num_devices = 4
  single = str(tmp_path / "single")
  records = rounds.run(cfg, single)
  shared_records = json.loads(read(shared, "summary.json"))
  assert [dict(r, seconds=0) for r in shared_records] == [dict(r, seconds=0) for r in records]
  for name in ("eval_test.jsonl", "eval_val.jsonl"):
    assert read(shared, "round_2", name) == read(single, "round_2", name)
  assert read(shared, "round_1", "mistakes.jsonl") == read(single, "round_1", "mistakes.jsonl")
  # one teacher, one writer: every request was paid once
  assert read(shared, "teacher_cache.jsonl").count("\n") == read(
      single, "teacher_cache.jsonl"
  ).count("\n")


def test_processes_on_unequal_machines_make_one_choice(tmp_path):
  """Process 1 has no C++ compiler and almost no free memory: without one decision for all,
  the processes would trace different attentions and exam batch shapes and hang. They run the
  XLA attention and the smallest batch everywhere, as one process configured so does."""
  from tests.test_rounds import tiny_config

  shared = str(tmp_path / "shared")
  unequal = {
      "CXX": "false",
      "TAILORED_JAX_CACHE": str(tmp_path / "empty_kernel_cache"),
      "TEST_DEVICE_BUDGET_BYTES": "1",
  }
  (rc0, out0), (rc1, out1) = run_two(shared, rounds=1, process_1_env=unequal)
  assert rc0 == 0 and rc1 == 0, (out0[-3000:], out1[-3000:])
  assert "native CPU attention off: another process of this run cannot build it" in out0
  batch_lines = lambda out: [
      line.split("] ")[-1] for line in out.splitlines() if "per batch" in line
  ]
  assert batch_lines(out0) == batch_lines(
      out1
  ) and "evaluate 1 (val, test): 4 prompts x 1 samples per batch (asked 8)" in (
      batch_lines(out0)[-1]
  )
  cfg = tiny_config()
  cfg.rounds = 1
  cfg.mesh.num_devices = 4
  cfg.model.attention = "cpu_blockwise"
  single = str(tmp_path / "single")
  records = rounds.run(cfg, single)
  shared_records = json.loads(read(shared, "summary.json"))
  assert [dict(r, seconds=0) for r in shared_records] == [dict(r, seconds=0) for r in records]
  assert read(shared, "round_1", "eval_test.jsonl") == read(single, "round_1", "eval_test.jsonl")


def test_a_sigterm_on_one_process_stops_both_at_the_same_decode_batch(tmp_path):
  """JAX's preemption service hears process 1's SIGTERM during the evaluation; both processes
  stop at the same sync point between decode batches, nothing hangs."""
  (rc0, out0), (rc1, out1) = run_two(
      str(tmp_path / "w"), rounds=1, process_1_env={"TEST_SIGTERM_AT_DECODE": "1"}
  )
  line = "Preempted: stopped by a preemption signal between decode batches"
  assert rc0 != 0 and rc1 != 0 and line in out0 and line in out1, (out0[-2000:], out1[-2000:])


def test_one_choice_survives_values_past_32_bits(monkeypatch):
  """`sharding.smallest` of device memories (80 GB here, 3 GB on the other process) through a
  gather that carries int32, as JAX's does without x64: the old int64 gather wrapped negative
  and every multi-host accelerator run refused its own train step."""
  import numpy as np
  from jax.experimental import multihost_utils

  from tailored_jax import sharding

  other = 3 * 10**9
  monkeypatch.setattr(sharding.jax, "process_count", lambda: 2)
  monkeypatch.setattr(
      multihost_utils,
      "process_allgather",
      lambda x: np.stack(
          [np.asarray(x).astype(np.int32), np.asarray(sharding_halves(other), np.int32)]
      ),
  )
  assert sharding.smallest(80 * 10**9) == other
  assert sharding.smallest(2 * 10**9) == 2 * 10**9


def sharding_halves(value: int):
  return [value >> 31, value & 0x7FFFFFFF]
