"""Tokenization exactly as transformers' AutoTokenizer does it, through generate and export."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from tailored_jax import export  # noqa: E402
from tailored_jax.data import batching  # noqa: E402
from tailored_jax.generate import generate  # noqa: E402
from tailored_jax.student_io import vocab  # noqa: E402
from tailored_jax.student_io.pretrained import _gguf_special_tokens, open_pretrained  # noqa: E402
from tailored_jax.student_io.student import load_student  # noqa: E402
from tailored_jax.sample.sampling import SamplingConfig  # noqa: E402

CORPUS = [
    f"Question: {n} has {a} plums and buys {b} more. How many?\nReasoning: {a} + {b} = "
    f"{a + b}.\nAnswer: {a + b}"
    for n in ("Mia", "Leo", "Ava")
    for a in range(9)
    for b in range(9)
]
PREFIX = "Question: Leo has 3 plums and buys 4 more. How many?\nReasoning:"
CONTINUATION = " 3 + 4 = 7.\nAnswer: 7"


def bpe(specials: list[str]) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
      CORPUS,
      trainers.BpeTrainer(
          vocab_size=300,
          special_tokens=specials,
          show_progress=False,
          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      ),
  )
  return tok


def no_bos_bpe():
  """A BPE that adds nothing, while tokenizer_config and config.json name a BOS."""
  return bpe(["<s>", "</s>"]), {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": "<s>",
      "eos_token": "</s>",
  }


def llama3_style():
  """LLaMA 3: the post-processor puts <|begin_of_text|> before every sequence."""
  tok = bpe(["<|begin_of_text|>", "<|end_of_text|>"])
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A",
      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
      special_tokens=[("<|begin_of_text|>", 0)],
  )
  return tok, {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": "<|begin_of_text|>",
      "eos_token": "<|end_of_text|>",
  }


def gpt2_style():
  """GPT-2 / GPT-J: <|endoftext|> is bos, eos and unk, and is never added by the tokenizer."""
  return bpe(["<|endoftext|>"]), {
      "tokenizer_class": "GPT2Tokenizer",
      "bos_token": "<|endoftext|>",
      "eos_token": "<|endoftext|>",
      "unk_token": "<|endoftext|>",
  }


def model_config(family: str, vocab_size: int):
  common = dict(
      vocab_size=vocab_size,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      max_position_embeddings=256,
      bos_token_id=0,
      eos_token_id=1,
  )
  if family == "llama":
    return transformers.LlamaConfig(**common)
  if family == "mistral":
    return transformers.MistralConfig(**common, sliding_window=4096)
  return transformers.GPTJConfig(
      vocab_size=vocab_size,
      n_embd=32,
      n_layer=1,
      n_head=2,
      rotary_dim=8,
      n_positions=256,
      bos_token_id=0,
      eos_token_id=0,
  )


CASES = [
    ("no_bos", "llama"),
    ("no_bos", "mistral"),
    ("no_bos", "gptj"),
    ("llama3", "llama"),
    ("gpt2", "gptj"),
]
TOKENIZERS = {"no_bos": no_bos_bpe, "llama3": llama3_style, "gpt2": gpt2_style}


def make_source(tmp_path, tokenizer_case, family):
  tok, settings = TOKENIZERS[tokenizer_case]()
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      model_config(family, tok.get_vocab_size())
  ).eval()
  source = tmp_path / "source"
  model.save_pretrained(source)
  tok.save(str(source / "tokenizer.json"))
  (source / "tokenizer_config.json").write_text(json.dumps(settings))
  return model, source


@pytest.mark.parametrize("tokenizer_case,family", CASES)
def test_ids_greedy_and_export_match_transformers(tokenizer_case, family, tmp_path):
  model, source = make_source(tmp_path, tokenizer_case, family)
  reference = transformers.AutoTokenizer.from_pretrained(source)
  ours = open_pretrained(str(source)).tokenizer
  for text in (PREFIX, PREFIX + CONTINUATION, " 12,345 apples", ""):
    assert ours.encode(text) == reference(text)["input_ids"], text
  if tokenizer_case == "llama3":
    assert ours.encode("a")[0] == reference.bos_token_id
  else:
    assert reference.bos_token_id not in ours.encode(PREFIX)

  student = load_student(str(source))
  ids = reference(PREFIX, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    expected = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=reference.eos_token_id,
        pad_token_id=reference.eos_token_id,
    )[0, ids.shape[1] :].tolist()
  got, _ = generate(student, PREFIX, 12, SamplingConfig())
  assert got == expected

  # The trainer's ids for a training string are what the exported tokenizer gives.
  trainer_tok = vocab.add_pad_token(ours) if vocab.needs_pad(ours) else ours
  batcher = batching.Batcher(
      trainer_tok,
      {"q": PREFIX},
      [batching.TrainExample("q", CONTINUATION)],
      {},
      batch_size=1,
      max_seq_len=128,
      max_continuation_len=64,
      prefix_weight=0.1,
      max_positives=10,
      max_negatives=4,
  )
  lm, _ = batcher.build([0], seed=0)
  n = int(lm.input_mask[0].sum())
  trained = lm.inputs[0, :n].tolist() + [int(lm.targets[0, n - 1])]
  out = tmp_path / "exported"
  export.export(str(source), str(out))
  exported = transformers.AutoTokenizer.from_pretrained(out)
  assert trained == exported(PREFIX + CONTINUATION)["input_ids"] + [exported.eos_token_id]
  assert exported(PREFIX)["input_ids"] == reference(PREFIX)["input_ids"]


class _Field:

  def __init__(self, value):
    self.value = value

  def contents(self):
    return self.value


class _Reader:

  def __init__(self, **fields):
    self.fields = {f"tokenizer.ggml.{k}": _Field(v) for k, v in fields.items()}


def test_gguf_special_tokens_follow_the_files_flags():
  tok = bpe(["<s>", "</s>"])
  bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
  content = tok.encode("a b").ids
  with_bos = _gguf_special_tokens(_Reader(add_bos_token=True), tok, bos, eos)
  assert with_bos.encode("a b").ids == [bos] + content
  both = _gguf_special_tokens(_Reader(add_bos_token=True, add_eos_token=True), tok, bos, eos)
  assert both.encode("a b").ids == [bos] + content + [eos]
  assert (
      _gguf_special_tokens(_Reader(add_bos_token=False), with_bos, bos, eos).encode("a b").ids
      == content
  )
  assert _gguf_special_tokens(_Reader(), with_bos, bos, eos).encode("a b").ids == [bos] + content
  assert np.array_equal(tok.encode("a b").ids, content)  # the input is left as it was
