"""Checkpoint checksums from each process's own shards (`shard_checksums`): the same sum for any
layout, no array gathered, a checkpoint saved on one mesh verified on another; two processes."""

import subprocess
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tailored_jax import checkpointing, shard_checksums, sharding
from tests.test_model_and_decode import _mesh_cfg
from tests.test_multihost import ROOT, free_port
from tests.processes import child_env

VALUES = {
    "w": np.random.default_rng(0).standard_normal((8, 6, 4)).astype(np.float32),
    "b": np.arange(16, dtype=np.int32),
    "m": np.random.default_rng(1).integers(0, 2, (4, 8)).astype(bool),
    "s": np.float32(3.5),
}


def _placed(mesh_shape, specs):
  mesh = sharding.make_mesh(_mesh_cfg(*mesh_shape))
  return {
      k: jax.device_put(v, NamedSharding(mesh, PartitionSpec(*specs.get(k, ()))))
      for k, v in VALUES.items()
  }


def test_the_sum_is_the_same_for_every_layout():
  whole = {f"['{k}']": shard_checksums.host_hex64(v) for k, v in VALUES.items()}
  layouts = [
      ((1, 8, 1, 8), {"w": ("fsdp",), "b": ("fsdp",), "m": (None, "fsdp")}),
      ((2, 2, 2, 8), {"w": ("fsdp", "tensor"), "m": ("data", "fsdp")}),  # 2 replicas of "w"
      ((1, 1, 1, 1), {}),
  ]
  for mesh_shape, specs in layouts:
    got = checkpointing.checksums(_placed(mesh_shape, specs))
    assert {k: v["hash64"] for k, v in got.items()} == whole


def test_one_changed_element_or_a_moved_one_changes_the_sum():
  w = VALUES["w"]
  changed, swapped = w.copy(), w.copy()
  changed[3, 2, 1] = np.nextafter(changed[3, 2, 1], np.float32(9))
  swapped[[0, 1]] = swapped[[1, 0]]
  transposed = np.ascontiguousarray(w.reshape(6, 8, 4))  # the same bytes, another shape
  sums = {shard_checksums.host_hex64(x) for x in (w, changed, swapped, transposed)}
  assert len(sums) == 4


def test_a_checkpoint_saved_on_one_mesh_verifies_on_another(tmp_path):
  saved = _placed((1, 8, 1, 8), {"w": ("fsdp",), "b": ("fsdp",)})
  steps = checkpointing.StepCheckpoints(str(tmp_path / "ckpt"))
  steps.save(1, saved)
  other = _placed((2, 1, 4, 8), {"w": (None, None, "tensor"), "m": ("data",)})
  step, restored = steps.restore_latest_intact(other, jax.tree.map(lambda x: x.sharding, other))
  steps.close()
  assert step == 1 and restored["w"].sharding == other["w"].sharding
  np.testing.assert_array_equal(np.asarray(restored["w"]), VALUES["w"])


WORKER = r"""
import os, sys
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[3])
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tailored_jax import checkpointing, sharding
from tests.test_model_and_decode import _mesh_cfg
def no_gather(*args, **kwargs):
  raise AssertionError("an array gathered across processes")
multihost_utils.process_allgather = no_gather
mesh = sharding.make_mesh(_mesh_cfg(1, 4, 1, 0))
w = np.random.default_rng(0).standard_normal((16, 1024)).astype(np.float32)
placed = sharding.put_global(w, NamedSharding(mesh, PartitionSpec("fsdp")))
print("HASH", checkpointing.checksums({"w": placed})["['w']"]["hash64"])
"""


def test_two_processes_hash_their_own_shards_without_gathering_an_array():
  address = f"127.0.0.1:{free_port()}"
  env = child_env()
  workers = [
      subprocess.Popen(
          [sys.executable, "-c", WORKER, address, str(i), ROOT],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  try:
    outputs = [w.communicate(timeout=120)[0] for w in workers]
  finally:
    for w in workers:
      w.kill()
  assert all(w.returncode == 0 for w in workers), outputs
  w = np.random.default_rng(0).standard_normal((16, 1024)).astype(np.float32)
  want = f"HASH {shard_checksums.host_hex64(w)}"
  assert all(want in out for out in outputs), (want, outputs)


def test_a_manifest_written_before_hash64_still_verifies(tmp_path):
  """Checkpoints of earlier versions carry CRC-32s of whole arrays: checked that way."""
  import json

  saved = _placed((1, 1, 1, 1), {})
  steps = checkpointing.StepCheckpoints(str(tmp_path / "ckpt"))
  steps.save(1, saved)
  steps.wait()  # committed, its manifest written
  manifest = tmp_path / "ckpt" / "1" / checkpointing.MANIFEST
  record = json.loads(manifest.read_text())
  record["arrays"] = checkpointing.crc32_checksums(saved)
  manifest.write_text(json.dumps(record))
  assert steps.restore_latest_intact(saved, jax.tree.map(lambda x: x.sharding, saved))[0] == 1
  record["arrays"]["['w']"]["crc32"] ^= 1
  manifest.write_text(json.dumps(record))
  assert steps.restore_latest_intact(saved, jax.tree.map(lambda x: x.sharding, saved)) is None
  steps.close()
