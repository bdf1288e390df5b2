"""The TPU compiler on this CPU machine (libtpu's compile-only devices for a v5e 2x2 slice): a
tiny model's train step (LM + self-reflection) and exam decode compile with the splash kernel
chosen for TPU devices, and at 2048 tokens its temporaries are below the XLA form's."""

import importlib.util
import os

import jax
import pytest

from tailored_jax import config_lib, plan, sharding, tpu_slices
from tailored_jax.models import model_for
from tailored_jax.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu is not installed here (pip install "jax[tpu]==<the installed jax version>")',
)
TOPOLOGY = "v5e:2x2"


def _config(attention: str, seq: int = 2048):
  cfg = config_lib.from_file(os.path.join(ROOT, "configs", "quickstart.py"))
  cfg.model.update(attention=attention, dtype="bfloat16", remat="full", scan_layers=True)
  cfg.train.update(batch_size=4, sr_batch_size=4, max_seq_len=seq, max_continuation_len=256)
  cfg.exam.update(batch_size=4, num_samples=2, max_new_tokens=16)
  cfg.mesh.update(data=1, fsdp=4, tensor=1, num_devices=4)
  return cfg


@pytest.fixture(scope="module")
def devices():
  return tpu_slices.compile_only_devices(TOPOLOGY)


def test_the_plan_compiles_both_steps_for_the_slice_with_the_splash_kernel(devices):
  """The train step with the splash kernel; the exam's continuous decode (advance and insert);
  one decode step in each decode layout, ranked by the compiler's numbers."""
  report = plan.lower(_config("auto", 512), "tiny", 17.18, True, devices, TOPOLOGY, True)
  assert report["compiler"] == "tpu" and report["attention"] == "splash"
  kernels = report["train_step"]["custom_calls"]
  assert any(name.startswith("tpu_custom_call:splash_mha_fwd") for name in kernels), kernels
  assert any(name.startswith("tpu_custom_call:splash_mha_dq") for name in kernels), kernels
  assert report["train_step"]["fits"] and report["train_step"]["largest_batch_that_fits"] >= 4
  # 4 x 512 LM tokens and 4 x 3 x 256 continuation tokens trained (6 FLOPs per parameter,
  # 2 more recomputed under full remat), 4 x 256 prefix tokens forward only; over 4 chips
  flops = report["parameters"] * (8 * (4 * 512 + 4 * 3 * 256) + 2 * 4 * 256) / 4
  assert report["train_step"]["roofline"]["model_flops_per_device"] == flops
  exam = report["exam_decode"]
  assert exam["form"] == "continuous" and exam["xla_bytes_per_device"]["total"] > 0
  assert exam["insert"]["xla_bytes_per_device"]["total"] > 0  # per-row scatter into the slots
  layouts = exam["layouts"]
  assert set(layouts) == {"model_parallel", "replicated", "train"}
  # whole weights on each of the 4 chips, each decoding its own rows: nothing moves per token
  assert layouts["replicated"]["copies_of_the_weights"] == 4
  assert layouts["replicated"]["collectives_per_token"] == {}
  assert (
      layouts["model_parallel"]["weights_per_device"] < layouts["replicated"]["weights_per_device"]
  )
  assert layouts["model_parallel"]["collectives_per_token"]["all-reduce"]["count"] > 0
  chip = tpu_slices.parse(TOPOLOGY).chip
  for entry in layouts.values():
    moved = sum(kind["bytes"] for kind in entry["collectives_per_token"].values())
    seconds = max(
        entry["compiler_flops_per_device"] / (chip.bf16_tflops * 1e12),
        entry["compiler_bytes_accessed_per_device"] / (chip.hbm_gb_per_s * 1e9),
    ) + moved / (chip.ici_gb_per_s * 1e9)
    assert entry["estimated_seconds_per_step"] == pytest.approx(seconds, rel=1e-12)
    assert entry["estimated_tokens_per_second"] == pytest.approx(8 / seconds, rel=1e-12)
  speed = {name: entry["estimated_tokens_per_second"] for name, entry in layouts.items()}
  assert exam["best_layout"] == max(speed, key=speed.get)


def test_the_splash_step_needs_less_temporary_memory_than_the_xla_form(devices):
  """At 2048 tokens the XLA form materialises [rows, heads, 2048, 2048] scores per layer."""
  temp = {}
  for attention in ("splash", "xla"):
    cfg = _config(attention)
    mesh = sharding.make_mesh(cfg, devices)
    trainer = Trainer(model_for(plan.model_config("tiny", cfg.model)), cfg.train, mesh)
    assert trainer.model.cfg.attention == attention
    lm, reflection = plan.abstract_batches(cfg, mesh)
    compiled = trainer.step_fn().lower(trainer.abstract_state(), lm, reflection, None).compile()
    temp[attention] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["splash"] < 0.5 * temp["xla"], temp


def test_a_topology_libtpu_cannot_lay_out_is_refused_by_name():
  with pytest.raises(tpu_slices.TopologyError, match=r"'v5e:2x3'"):
    tpu_slices.compile_only_devices("v5e:2x3")
  with pytest.raises(tpu_slices.TopologyError, match=r"GENERATION:DIMS"):
    tpu_slices.parse("v9:2x2")
  assert config_lib.mesh_preset("v5e:4x4") == (16, 16 * tpu_slices.GIB / 1e9, (1, 16, 1))
  assert jax.default_backend() == "cpu"  # nothing here opened a TPU
