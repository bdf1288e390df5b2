"""An open instruct model as the teacher (`teacher.kind=open_model`, `teacher.model_path`: an HF
directory or a GGUF file the project reads), on the run's own devices, sharing the slice with
the student: the prompts in the model's chat template, each phase's requests decoded as batched
generations (`n` samples per request, rows sharded over the mesh like the exam), replies kept in
the teacher cache like an API's, so a resume or `teacher.kind=replay` reads them back. Every
process runs it (the decode is one SPMD program); process 0 alone writes the cache. Its weights
are loaded at the first request and held until the run closes the teacher.
"""

from __future__ import annotations

import itertools
import os

import flax.linen as nn
import jax
import jinja2.sandbox

from tailored_jax import sharding
from tailored_jax import workdir as wd
from tailored_jax.models import for_devices, layers, model_for
from tailored_jax.sample.decode import Decoder, StopTables
from tailored_jax.sample.runner import generate_texts
from tailored_jax.sample.sampling import SamplingConfig
from tailored_jax.student_io.pretrained import open_pretrained
from tailored_jax.teacher.cache import ReplyCache, request_key
from tailored_jax.teacher.client import ChatReply, TeacherError, Usage
from tailored_jax.teacher.protocols import ChatRequest


class OpenModelTeacher:
  """`run(requests, on_reply, label)` as `ChatClient.run`, answered by a model on the mesh."""

  def __init__(
      self,
      path: str,
      mesh,
      cache: ReplyCache,
      *,
      batch_size: int,
      memory_budget_gb: float,
      seed: int,
      decode_layout: str = "train",
      continuous_batching: bool = True,
  ):
    self.path, self.mesh, self.cache = path, mesh, cache
    self.continuous_batching = continuous_batching
    self.model_name = os.path.basename(path.rstrip("/"))
    self.batch_size, self.seed, self.decode_layout = batch_size, seed, decode_layout
    self.memory_budget_bytes = int(memory_budget_gb * 2**30)
    self.pretrained = open_pretrained(path)
    if not self.pretrained.chat_template:
      raise TeacherError(
          f"config field teacher.model_path: {path} has no chat template (an instruct model's "
          "tokenizer_config.json or GGUF metadata carries one)"
      )
    self.template = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True
    ).from_string(self.pretrained.chat_template)
    self._decoder = self._params = None

  def prompt(self, messages: list[dict]) -> str:
    """The messages in the model's chat template, ready for the assistant's reply. A BOS the
    template writes is dropped when the tokenizer inserts its own."""
    tok = self.pretrained.tokenizer
    bos = tok.backend.id_to_token(tok.bos_id) if tok.bos_id is not None else None
    text = self.template.render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=bos or "",
        eos_token=tok.backend.id_to_token(tok.eos_id) or "",
    )
    if bos and text.startswith(bos) and tok.encode("")[:1] == [tok.bos_id]:
      text = text[len(bos) :]
    return text

  def _load(self):
    if self._decoder is None:
      cfg = self.pretrained.cfg
      model = for_devices(model_for(cfg), self.mesh.devices.flat)
      tok = self.pretrained.tokenizer
      self._decoder = Decoder(
          model, StopTables.from_tokenizer(tok, cfg.vocab_size, blank_line=False)
      )
      boxed = layers.abstract_boxed_params(self._decoder.model)
      targets = sharding.decode_shardings(
          nn.get_partition_spec(boxed), nn.meta.unbox(boxed), self.mesh, self.decode_layout
      )
      self._params = self.pretrained.load_params(
          lambda path, array: sharding.put_global(
              array.astype(cfg.param_dtype), layers.tree_get(targets, path)
          )
      )
    return self._decoder, self._params

  def payload(self, request: ChatRequest) -> dict:
    return {
        "model": self.model_name,
        "messages": request.messages,
        "n": request.n,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }

  def run(self, requests: list[ChatRequest], on_reply=None, label: str = ""):
    usage = Usage()
    results: list[ChatReply | None] = [None] * len(requests)
    todo = []
    for i, request in enumerate(requests):
      entry = self.cache.get(request_key(self.payload(request)))
      if entry is None:
        todo.append(i)
        continue
      usage.cache_hits += 1
      recorded = entry.get("usage") or {}
      usage.cached_tokens += recorded.get("prompt_tokens", 0) + recorded.get("completion_tokens", 0)
      results[i] = ChatReply(
          entry["texts"], 0, 0, True, entry.get("finish_reasons") or ["stop"] * len(entry["texts"])
      )
    # one generation per (n, temperature, max_tokens): a call decodes with one setting
    setting = lambda i: (requests[i].n, requests[i].temperature, requests[i].max_tokens)
    for (n, temperature, max_tokens), group in itertools.groupby(
        sorted(todo, key=setting), setting
    ):
      group = list(group)
      decoder, params = self._load()
      tok = self.pretrained.tokenizer
      prompts = [self.prompt(requests[i].messages) for i in group]
      outputs = generate_texts(
          decoder,
          params,
          tok,
          prompts,
          mesh=self.mesh,
          num_samples=n,
          sampling=SamplingConfig(temperature=temperature),
          max_new_tokens=max_tokens,
          batch_size=self.batch_size,
          rng=jax.random.PRNGKey(self.seed),
          label=f"{label or 'teacher'} ({self.model_name})",
          decode_layout=self.decode_layout,
          memory_budget_bytes=self.memory_budget_bytes,
          continuous=self.continuous_batching,
      )
      for i, prompt, texts in zip(group, prompts, outputs):
        lengths = [len(tok.encode(t)) for t in texts]
        reasons = ["length" if k >= max_tokens else "stop" for k in lengths]
        prompt_tokens, completion_tokens = len(tok.encode(prompt)), sum(lengths)
        usage.paid(prompt_tokens, completion_tokens)
        if wd.is_writer():
          self.cache.put(
              request_key(self.payload(requests[i])),
              self.payload(requests[i]),
              texts,
              {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
              reasons,
          )
        results[i] = ChatReply(texts, prompt_tokens, completion_tokens, False, reasons)
    if wd.is_writer():
      self.cache.flush()
    for i, reply in enumerate(results):
      if on_reply is not None and not reply.cached:
        on_reply(i, reply)
    return results, usage

  def release(self) -> None:
    """Drops the weights (the student gets the memory back)."""
    self._decoder = self._params = None
