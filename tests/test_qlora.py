"""QLoRA: a frozen base stored as int8 or NF4 codes dequantises within its format's error,
a quantised model is exactly its dequantised twin, and a step leaves the codes to the byte."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailored_jax import config_lib, sharding
from tailored_jax.models import for_decoding, layers, lora, quantize
from tailored_jax.models.gptj import GPTJ
from tailored_jax.models.llama import Llama
from tailored_jax.train.trainer import Trainer
from tests.test_lora import GPTJ_CFG, LLAMA, _forward
from tests.test_model_and_decode import _batch, _mesh_cfg, _train_cfg

NF4_HALF_GAP = float(np.max(np.diff(quantize.NF4))) / 2


@pytest.mark.parametrize("kind", quantize.KINDS)
@pytest.mark.parametrize("shape, n_in", [((64, 4, 16), 1), ((4, 16, 64), 2), ((96, 40), 1)])
def test_dequantised_weights_are_within_the_formats_error(kind, shape, n_in):
  w = np.random.default_rng(0).standard_t(4, size=shape).astype(np.float32)  # heavy tails
  q = quantize.quantize(w, n_in, kind)
  back = np.asarray(quantize.dequantize(jax.tree.map(jnp.asarray, q), n_in, kind, jnp.float32))
  b = quantize.block(shape[n_in - 1])
  blocks = np.abs(w).reshape(*shape[: n_in - 1], shape[n_in - 1] // b, b, *shape[n_in:])
  absmax = np.expand_dims(blocks.max(axis=n_in), n_in).repeat(b, axis=n_in).reshape(shape)
  bound = absmax * (0.5 / 127 if kind == "int8" else NF4_HALF_GAP) + 1e-6
  assert np.all(np.abs(back - w) <= bound)
  assert q["codes"].nbytes == w.size * (1 if kind == "int8" else 0.5)  # 8 or 4 bits a weight
  assert q["scale"].nbytes == 4 * w.size // b  # and a float32 scale per block


@pytest.mark.parametrize("kind", quantize.KINDS)
@pytest.mark.parametrize("cfg", [LLAMA, GPTJ_CFG], ids=["llama", "gptj"])
def test_a_quantised_base_is_exactly_its_dequantised_twin(kind, cfg):
  cfg = dataclasses.replace(cfg, base_quantization=kind)
  model = (Llama if cfg.__class__.__name__ == "LlamaConfig" else GPTJ)(cfg)
  params = nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(0)))

  def quantised(tree):
    for k, v in tree.items():
      if quantize.is_quantized(v):
        yield k, v
      elif isinstance(v, dict):
        yield from quantised(v)

  found = dict(quantised(params["layer_0"]))
  mlp = ("w_gate", "w_up", "w_down") if isinstance(model, Llama) else ("w_in", "w_out")
  assert set(found) == {"wq", "wk", "wv", "wo", *mlp}  # every projection, nothing else
  stored = found["wq"]
  assert stored["codes"].dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 40, (2, 7)), jnp.int32)
  twin = for_decoding(model)  # float weights, no adapters: what decoding runs
  np.testing.assert_allclose(
      _forward(model, params, tokens),
      _forward(twin, lora.folded(params, cfg), tokens),
      atol=2e-5,
      rtol=1e-5,
  )


def test_a_qlora_step_leaves_the_codes_to_the_byte(kind="nf4"):
  cfg = dataclasses.replace(LLAMA, base_quantization=kind, scan_layers=True, remat="full")
  trainer = Trainer(Llama(cfg), _train_cfg(), sharding.make_mesh(_mesh_cfg(2, 2, 2, 8)))
  state = trainer.new_state(trainer.init_params(1))
  base = [np.asarray(x).tobytes() for x in jax.tree.leaves(lora.split(state.params)[0])]
  lm, reflection = trainer.put_batch(_batch(np.random.default_rng(1)))
  state, metrics = trainer.step_fn()(state, lm, reflection)
  assert np.isfinite(float(metrics["loss"]))
  after = [np.asarray(x).tobytes() for x in jax.tree.leaves(lora.split(state.params)[0])]
  assert after == base
  codes = state.params["layers"]["attn"]["wq"]["codes"]
  assert codes.shape[0] == cfg.n_layers and codes.dtype != jnp.float32


def test_a_quantised_base_needs_adapters():
  cfg = config_lib.base_config()
  cfg.model.base_quantization = "nf4"
  with pytest.raises(config_lib.ConfigError, match="model.base_quantization"):
    config_lib.validate(cfg)
  cfg.model.base_quantization = "int4"
  cfg.model.lora_rank = 8
  with pytest.raises(config_lib.ConfigError, match="none, int8 or nf4"):
    config_lib.validate(cfg)


def test_a_qlora_round_from_a_pretrained_student(tmp_path):
  """init_from an HF GPT-J with an NF4 base: the projections are quantised on the host as they
  stream in (the round checkpoint's codes are those of the HF weights), the adapters train,
  and the round evaluates on the dequantised, merged weights; --peft exports the adapters."""
  from safetensors.numpy import load_file

  from tailored_jax import checkpointing, export, rounds
  from tailored_jax.student_io import hf_io
  from tests.test_rounds import tiny_config, tiny_gptj_source

  cfg = tiny_config()
  cfg.rounds, cfg.method.self_reflection, cfg.eval.initial = 1, False, False
  cfg.model.update(scan_layers=True, remat="full", lora_rank=4, base_quantization="nf4")
  source, _ = tiny_gptj_source(cfg, tmp_path)
  cfg.model.init_from = str(source)
  workdir = str(tmp_path / "run")
  records = rounds.run(cfg, workdir)
  assert [r["round"] for r in records] == [1] and records[0]["optimizer_steps"] > 0
  hf = load_file(str(source / "model.safetensors"))
  cfg_hf, _ = hf_io.config_from_hf(__import__("json").load(open(source / "config.json")))
  entry = hf_io.tensor_table(cfg_hf)["transformer.h.1.attn.q_proj.weight"]
  expected = quantize.quantize(entry.to_ours(hf["transformer.h.1.attn.q_proj.weight"]), 1, "nf4")
  manifest = open(f"{workdir}/checkpoints/round_1/0/{checkpointing.MANIFEST}").read()
  assert "['wq']['codes']" in manifest and "uint8" in manifest
  from tailored_jax.runtime import StudentRuntime

  run = rounds.Run(cfg, workdir)
  trained = StudentRuntime(cfg, run.layout, run.mesh, run.pretrained).params(1)
  run.close()
  stored = trained["layers"]["wq"]
  np.testing.assert_array_equal(np.asarray(stored["codes"][1]), expected["codes"])
  np.testing.assert_array_equal(np.asarray(stored["scale"][1]), expected["scale"])
  export.export_peft(f"{workdir}/checkpoints/round_1", str(tmp_path / "adapter"))
  assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
