"""GGUF files we write ourselves from a tiny HF LLaMA, one per tensor type (the types gguf-py can
quantise): our loader must return exactly gguf's dequantisation, un-permuted, in HF layout.
Q4_K/Q6_K go through the same `gguf.quants.dequantize` call (covered by SmolLM2's Q4_1/Q8_0
and by gguf-py itself); gguf-py cannot write them."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from tailored_jax.data.tokenizer import train_bpe  # noqa: E402
from tailored_jax.models import model_for  # noqa: E402
from tailored_jax.student_io import hf_io  # noqa: E402
from tailored_jax.student_io.pretrained import open_pretrained  # noqa: E402

N_HEADS, N_KV = 4, 2


def permute(w, heads):
  """llama.cpp's convert-time permutation of q/k rows."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
  top = {
      "model.embed_tokens.weight": "token_embd.weight",
      "model.norm.weight": "output_norm.weight",
      "lm_head.weight": "output.weight",
  }
  if hf_name in top:
    return top[hf_name]
  layer, rest = hf_name.split(".")[2], hf_name.split(".", 3)[3]
  rename = {
      "input_layernorm.weight": "attn_norm.weight",
      "post_attention_layernorm.weight": "ffn_norm.weight",
      "self_attn.q_proj.weight": "attn_q.weight",
      "self_attn.k_proj.weight": "attn_k.weight",
      "self_attn.v_proj.weight": "attn_v.weight",
      "self_attn.o_proj.weight": "attn_output.weight",
      "mlp.gate_proj.weight": "ffn_gate.weight",
      "mlp.up_proj.weight": "ffn_up.weight",
      "mlp.down_proj.weight": "ffn_down.weight",
  }
  return f"blk.{layer}.{rename[rest]}"


@pytest.fixture(scope="module")
def source():
  tok = train_bpe([f"Question: {i} + {i} = {2 * i}\nAnswer: {2 * i}" for i in range(200)], 300)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(
          vocab_size=tok.vocab_size,
          hidden_size=64,
          intermediate_size=128,
          num_hidden_layers=2,
          num_attention_heads=N_HEADS,
          num_key_value_heads=N_KV,
          rms_norm_eps=1e-5,
          tie_word_embeddings=False,
      )
  ).eval()
  return tok, model, {k: v.numpy() for k, v in model.state_dict().items()}


def write_gguf(path, tok, state, qtype):
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(2)
  writer.add_context_length(256)
  writer.add_embedding_length(64)
  writer.add_feed_forward_length(128)
  writer.add_head_count(N_HEADS)
  writer.add_head_count_kv(N_KV)
  writer.add_rope_freq_base(10000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  vocab = json.loads(tok.backend.to_str())["model"]
  tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
  writer.add_token_types([3 if t in ("<pad>", "<s>", "</s>") else 1 for t in tokens])
  writer.add_bos_token_id(tok.bos_id)
  writer.add_eos_token_id(tok.eos_id)
  expected = {}
  for name, w in state.items():
    w = w.astype(np.float32)
    if name.endswith("q_proj.weight"):
      stored = permute(w, N_HEADS)
    elif name.endswith("k_proj.weight"):
      stored = permute(w, N_KV)
    else:
      stored = w
    t = qtype if w.ndim == 2 else Q.F32
    data = quantize(stored, t)
    writer.add_tensor(gguf_name(name), data, raw_dtype=t)
    back = np.asarray(dequantize(data, t), np.float32).reshape(w.shape)
    if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
      heads = N_HEADS if "q_proj" in name else N_KV
      back = back.reshape(heads, back.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
    expected[name] = back
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return expected


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_each_type_loads_as_gguf_dequantises_it(source, tmp_path, qtype):
  tok, model, state = source
  path = tmp_path / f"tiny-{qtype.name}.gguf"
  expected = write_gguf(path, tok, state, qtype)
  pretrained = open_pretrained(str(path))
  assert pretrained.cfg.n_kv_heads == N_KV and not pretrained.cfg.tie_embeddings
  assert (pretrained.tokenizer.bos_id, pretrained.tokenizer.eos_id) == (tok.bos_id, tok.eos_id)
  got = hf_io.to_hf(pretrained.load_params(), pretrained.cfg)
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    assert np.array_equal(got[name], value), name
  if qtype == Q.F32:  # unquantised: the same model as the HF source
    ids = np.array([[5, 17, 42, 8, 33]])
    with torch.no_grad():
      want = model(torch.tensor(ids)).logits.numpy()
    logits, _, _ = model_for(pretrained.cfg).apply(
        {"params": pretrained.load_params()},
        ids.astype(np.int32),
        np.arange(5)[None],
        np.ones((1, 5), bool),
    )
    assert np.abs(np.asarray(logits) - want).max() <= 1e-4


def test_bad_gguf_files_are_named(tmp_path):
  bad = tmp_path / "broken.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(hf_io.ModelImportError, match=r"broken.gguf: not a readable GGUF file"):
    open_pretrained(str(bad))
  with pytest.raises(hf_io.ModelImportError, match=r"GGUF file not found"):
    open_pretrained(str(tmp_path / "missing.gguf"))
