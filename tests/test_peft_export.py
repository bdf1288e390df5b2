"""A LoRA student's adapters exported as a PEFT adapter directory: `peft.PeftModel` over the
transformers base model gives our LoRA logits (float32), for both families; the CLI refuses a
checkpoint without adapters or without a base model, in one line."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from tailored_jax.models import layers, lora, model_for  # noqa: E402
from tailored_jax.student_io import peft_io  # noqa: E402
from tests.test_hf_parity import build  # noqa: E402
from tests.test_lora import ALL  # noqa: E402


@pytest.mark.parametrize("name", ["llama_gqa", "gptj"])
def test_peft_loads_our_adapters_and_gives_our_logits(name, tmp_path):
  hf_model, cfg, _, base = build(name, tmp_path / "base")
  cfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
  model = model_for(cfg)
  _, adapters = lora.split(nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(1))))
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
  adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), adapters)
  params = lora.join(base, adapters)
  peft_io.save_peft_dir(
      str(tmp_path / "adapter"), jax.device_get(params), cfg, str(tmp_path / "base")
  )
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert saved["r"] == 4 and saved["lora_alpha"] == 8.0

  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
  positions = jnp.broadcast_to(jnp.arange(9), tokens.shape)
  ours = model.apply(
      {"params": params}, jnp.asarray(tokens), positions, jnp.ones(tokens.shape, bool)
  )[0]
  loaded = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = loaded(torch.as_tensor(tokens)).logits.numpy()
  with torch.no_grad(), loaded.disable_adapter():
    without = loaded(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(without - theirs).max() > 1e-2  # the adapters were loaded and matter
  assert np.abs(np.asarray(ours) - theirs).max() < 1e-4


def test_export_peft_refuses_a_student_without_adapters(tmp_path, reference):
  """The session's reference run trained its student without LoRA."""
  from tailored_jax import export

  checkpoint = f"{reference[0]}/checkpoints/round_1"
  with pytest.raises(ValueError, match=r"no LoRA adapters \(model.lora_rank was 0\)"):
    export.export_peft(checkpoint, str(tmp_path / "x"))
