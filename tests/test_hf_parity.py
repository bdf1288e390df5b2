"""Our Flax families (LLaMA, GPT-J, GPT-2, OPT) against transformers' PyTorch models (float32,
tiny random configs)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tailored_jax import sharding  # noqa: E402
from tailored_jax.models import layers  # noqa: E402
from tailored_jax.student_io import hf_io  # noqa: E402
from tailored_jax.models import model_for  # noqa: E402
from tailored_jax.sample import decode, sampling  # noqa: E402

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)

CASES = {
    "llama_gqa": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama3_rope": lambda: transformers.LlamaConfig(
        **dict(COMMON, rope_theta=500000.0),
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=4096),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_inner=112, n_positions=256
    ),
    "gpt_neo": lambda: transformers.GPTNeoConfig(
        vocab_size=96,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=112,
        max_position_embeddings=256,
        window_size=4,  # shorter than the test's sequences: the local layer's window shows
        attention_types=[[["global", "local"], 1]],
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=96,
        hidden_size=64,
        word_embed_proj_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=112,
        max_position_embeddings=256,
    ),
}


def build(name, tmp_path):
  torch.manual_seed(0)
  hf_config = CASES[name]()
  model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  with torch.no_grad():  # random, non-trivial norms and biases
    for pname, p in model.named_parameters():
      if "norm" in pname or "bias" in pname or "ln_" in pname:
        is_scale = pname.endswith("weight")
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if is_scale else 0.0))
  model.save_pretrained(tmp_path, safe_serialization=True)
  cfg, model_type = hf_io.config_from_hf(hf_config.to_dict())
  params = hf_io.load_params(hf_io.iter_hf_tensors(str(tmp_path)), cfg)
  return model, cfg, model_type, jax.tree.map(jnp.asarray, params)


def padded_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 96, (3, 10)).astype(np.int64)
  mask = np.ones((3, 10), np.int64)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  return tokens, mask


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_path):
  model, cfg, _, params = build(name, tmp_path)
  tokens, mask = padded_batch()
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  positions = np.broadcast_to(np.arange(10), tokens.shape)
  got, _, _ = model_for(cfg).apply(
      {"params": params},
      jnp.asarray(tokens, jnp.int32),
      jnp.asarray(positions),
      jnp.asarray(mask, bool),
  )
  valid = mask.astype(bool)
  diff = np.abs(np.asarray(got)[valid] - expected.numpy()[valid]).max()
  assert diff <= 1e-4, diff
  # the same weights stacked for a scan over layers, each block recomputed in the backward pass
  if getattr(cfg, "local_layers", ()):
    with pytest.raises(ValueError, match="set model.scan_layers=False"):
      model_for(dataclasses_replace(cfg, scan_layers=True)).apply(
          {"params": layers.stack_layers(params, cfg.n_layers)},
          jnp.asarray(tokens, jnp.int32),
          jnp.asarray(positions),
          jnp.asarray(mask, bool),
      )
    return
  scanned = model_for(dataclasses_replace(cfg, scan_layers=True, remat="full"))
  stacked = layers.stack_layers(jax.tree.map(lambda x: x, params), cfg.n_layers)
  assert sorted(stacked) == sorted([k for k in params if not k.startswith("layer_")] + ["layers"])
  got, _, _ = scanned.apply(
      {"params": stacked},
      jnp.asarray(tokens, jnp.int32),
      jnp.asarray(positions),
      jnp.asarray(mask, bool),
  )
  diff = np.abs(np.asarray(got)[valid] - expected.numpy()[valid]).max()
  assert diff <= 1e-4, diff
  # HF tensors from the stacked tree are the per-layer tree's, bit for bit
  for name, value in hf_io.to_hf(params, cfg).items():
    assert np.array_equal(hf_io.to_hf(stacked, cfg)[name], value), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_generation_matches_transformers(name, tmp_path):
  model, cfg, _, params = build(name, tmp_path)
  prompt = [5, 17, 42, 8, 33]
  with torch.no_grad():
    expected = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, 5, dtype=torch.long),
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, 5:].tolist()
  decoder = decode.Decoder(model_for(cfg), decode.StopTables.never_stop(cfg.vocab_size))
  tokens = np.array([[0, 0] + prompt], np.int32)  # left-padded, as the exam pads
  out, lengths = decoder(
      params,
      tokens,
      tokens > 0,
      jax.random.PRNGKey(0),
      max_new_tokens=32,
      num_samples=1,
      sampling=sampling.SamplingConfig(),
  )
  assert int(lengths[0]) == 32
  assert np.asarray(out[0]).tolist() == expected
  # the first 3 tokens as a shared prefix, prefilled once; the rest left-padded after it
  prefix = decoder.prefill(params, jnp.asarray(prompt[:3], jnp.int32))
  own = np.array([[0, 0, 0] + prompt[3:]], np.int32)
  out, _ = decoder(
      params,
      own,
      own > 0,
      jax.random.PRNGKey(0),
      max_new_tokens=32,
      num_samples=1,
      sampling=sampling.SamplingConfig(),
      prefix=prefix,
  )
  assert np.asarray(out[0]).tolist() == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_round_trip_is_bit_exact(name, tmp_path):
  model, cfg, model_type, params = build(name, tmp_path / "in")
  hf_io.save_hf_dir(str(tmp_path / "out"), jax.device_get(params), cfg, model_type)
  original = {k: v.numpy() for k, v in model.state_dict().items()}
  exported = dict((n, a) for _, n, a in hf_io.iter_hf_tensors(str(tmp_path / "out")))
  if getattr(cfg, "tie_embeddings", False):
    original.pop("lm_head.weight")
  original = {
      k: v
      for k, v in original.items()
      if not k.endswith((".attn.bias", ".attention.bias", "masked_bias"))
  }
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert np.array_equal(exported[key], value), key
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens, mask = padded_batch()
  with torch.no_grad():
    a = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    b = reloaded(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  assert torch.equal(a, b)


def test_import_errors_name_file_and_tensor(tmp_path):
  model, cfg, _, _ = build("llama_gqa", tmp_path)
  bad = dataclasses_replace(cfg, d_ff=100)
  with pytest.raises(
      hf_io.ModelImportError,
      match=r"model.safetensors: tensor "
      r"'model.layers.0.mlp.(gate|up|down)_proj.weight' "
      r"has shape",
  ):
    hf_io.load_params(hf_io.iter_hf_tensors(str(tmp_path)), bad)
  with pytest.raises(hf_io.ModelImportError, match=r"model_type 'gpt_neox' is not supported"):
    hf_io.config_from_hf({"model_type": "gpt_neox"})
  with pytest.raises(hf_io.ModelImportError, match=r"no model.safetensors"):
    hf_io.safetensors_files(str(tmp_path / "nowhere"))


def dataclasses_replace(cfg, **changes):
  import dataclasses

  return dataclasses.replace(cfg, **changes)


def test_sharded_forward_matches_unsharded(tmp_path):
  _, cfg, _, params = build("llama_gqa", tmp_path)
  tokens, mask = padded_batch()
  tokens = np.concatenate([tokens] * 2 + [tokens[:2]])[:8].astype(np.int32)
  mask = np.concatenate([mask] * 2 + [mask[:2]])[:8].astype(bool)
  positions = np.broadcast_to(np.arange(10), tokens.shape)
  model = model_for(cfg)
  forward = jax.jit(lambda p, t, pos, m: model.apply({"params": p}, t, pos, m)[0])
  single = forward(params, tokens, positions, mask)
  mesh_cfg = ml_collections.ConfigDict({"mesh": dict(data=2, fsdp=2, tensor=2, num_devices=0)})
  mesh = sharding.make_mesh(mesh_cfg)
  boxed = jax.eval_shape(lambda: layers.init_boxed_params(model, jax.random.PRNGKey(0)))
  shardings = sharding.logical_sharding(boxed, mesh)
  sharded_params = jax.device_put(params, shardings)
  assert sharded_params["layer_0"]["mlp"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor"
  )
  put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))
  got = forward(sharded_params, put(tokens), put(np.asarray(positions)), put(mask))
  np.testing.assert_allclose(np.asarray(got), np.asarray(single), atol=1e-5)
  # scanned: the stacked layer axis stays whole, the rest sharded as before
  scanned = model_for(dataclasses_replace(cfg, scan_layers=True, remat="full"))
  boxed = jax.eval_shape(lambda: layers.init_boxed_params(scanned, jax.random.PRNGKey(0)))
  stacked = jax.device_put(
      layers.stack_layers(jax.tree.map(lambda x: x, params), cfg.n_layers),
      sharding.logical_sharding(boxed, mesh),
  )
  assert stacked["layers"]["mlp"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor"
  )
  forward = jax.jit(lambda p, t, pos, m: scanned.apply({"params": p}, t, pos, m)[0])
  got = forward(stacked, put(tokens), put(np.asarray(positions)), put(mask))
  np.testing.assert_allclose(np.asarray(got), np.asarray(single), atol=1e-5)


def test_gpt2_adapters_on_the_fused_c_attn_are_refused_by_the_peft_export(tmp_path):
  """GPT-2 stores q, k and v as one HF tensor: adapters on them have no PEFT module to go to."""
  from tailored_jax.student_io import peft_io

  _, cfg, _, params = build("gpt2", tmp_path)
  params = jax.tree.map(np.asarray, params)
  params["layer_0"]["wq_lora_a"] = np.zeros((64, 2), np.float32)
  with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight: fused"):
    peft_io.peft_tensors(params, cfg)
