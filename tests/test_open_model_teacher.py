"""An open model as the teacher (teacher.kind=open_model) on a tiny random GPT-J with a chat
template: its greedy reply is transformers' for the same rendered prompt, replies are cached
like an API's, and the loop's annotation phase runs on it with nothing sent anywhere."""

import json

import ml_collections
import numpy as np
import pytest

from tailored_jax import rounds, sharding
from tailored_jax.teacher import prompts
from tailored_jax.teacher.cache import ReplyCache
from tailored_jax.teacher.open_model import OpenModelTeacher
from tailored_jax.teacher.protocols import ChatRequest
from tests.test_rounds import read, tiny_config, tiny_gptj_source

TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  source, tok = tiny_gptj_source(tiny_config(), tmp_path_factory.mktemp("teacher"))
  settings = json.loads((source / "tokenizer_config.json").read_text())
  settings["chat_template"] = TEMPLATE
  (source / "tokenizer_config.json").write_text(json.dumps(settings))
  return source


def one_device_mesh():
  return sharding.make_mesh(
      ml_collections.ConfigDict({"mesh": dict(data=1, fsdp=1, tensor=1, num_devices=1)})
  )


def test_greedy_replies_are_transformers_and_are_cached(teacher_dir, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cache = ReplyCache(str(tmp_path / "cache.jsonl"), prompts.PROMPT_VERSION)
  teacher = OpenModelTeacher(
      str(teacher_dir), one_device_mesh(), cache, batch_size=4, memory_budget_gb=1.0, seed=0
  )
  messages = [
      {"role": "system", "content": "You are a teacher."},
      {"role": "user", "content": "Ava has 5 pens. Ava buys 3 more pens."},
  ]
  text = teacher.prompt(messages)
  assert text == (
      "system: You are a teacher.\n<s>user: Ava has 5 pens. Ava buys 3 more pens.\nassistant:"
  )  # the template's first BOS dropped: the tokenizer inserts one
  requests = [ChatRequest(messages, n=1, temperature=0.0, max_tokens=12)]
  results, usage = teacher.run(requests, label="annotate")
  tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
  ids = tokenizer(text, return_tensors="pt").input_ids
  with torch.no_grad():
    out = model.generate(
        ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id
    )
  expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
  assert results[0].texts == [expected] and usage.requests == 1
  assert usage.prompt_tokens == ids.shape[1] and results[0].finish_reasons in (["length"], ["stop"])
  again, usage = teacher.run(requests)
  assert again[0].texts == [expected] and usage.cache_hits == 1 and usage.requests == 0
  entry = next(iter(cache._entries.values()))
  assert entry["request"]["model"] == teacher_dir.name and np.isfinite(
      entry["usage"]["prompt_tokens"]
  )


def test_the_loop_annotates_with_an_open_model(teacher_dir, tmp_path, paid):
  cfg = tiny_config()
  cfg.teacher.update(kind="open_model", model_path=str(teacher_dir), max_tokens=8)
  workdir = str(tmp_path / "run")
  with pytest.raises(rounds.RunStopped):
    rounds.run(cfg, workdir, stop_after="annotate")
  report = json.loads(read(workdir, "round_1", "teacher.json"))
  assert paid["n"] == 0 and report["usage"]["requests"] == 16  # one request per question
  assert report["usage"]["completion_tokens"] > 0
  judged = report["kept"] + sum(report["dropped"].values())
  assert judged == 16 * cfg.teacher.num_rationales  # every reply parsed and answer-checked
  cached = [json.loads(x) for x in read(workdir, "teacher_cache.jsonl").splitlines()]
  assert len(cached) == 16 and all(len(e["texts"]) == cfg.teacher.num_rationales for e in cached)
