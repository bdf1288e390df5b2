"""The host-side round loop of Tailored Learning, as resumable phases over a workdir.

prepare → annotate (D_1) → [exam_0 (N_0)] → for r = 1..R: train_r → evaluate_r →
(r < R) exam_r (N_r) → feedback_r (D_{r+1}). Each phase writes its outputs, then marks itself
done in state.json; a re-run skips done phases, reuses cached teacher replies and resumes a
killed training round from its newest checkpoint.
"""

from __future__ import annotations

import collections
import json
import logging
import time

import jax
import ml_collections

from tailored_jax import checkpointing, config_lib, preemption, sharding, storage, summary
from tailored_jax import workdir as wd
from tailored_jax.data import scoring
from tailored_jax.data.batching import Batcher, TrainExample
from tailored_jax.data.tasks import Example, build_task
from tailored_jax.data.tokenizer import Tokenizer, train_bpe
from tailored_jax.layout import Layout
from tailored_jax.metrics import Metrics
from tailored_jax.student_io import vocab
from tailored_jax.student_io.pretrained import Pretrained, open_pretrained
from tailored_jax.runtime import StudentRuntime
from tailored_jax.progress import Progress
from tailored_jax.sample.runner import generate_texts
from tailored_jax.sample.sampling import SamplingConfig
from tailored_jax.teacher import prompts as teacher_prompts
from tailored_jax.teacher.api_key import read_api_key
from tailored_jax.teacher.batch import BatchOptions
from tailored_jax.teacher.open_model import OpenModelTeacher
from tailored_jax.teacher.cache import ReplyCache
from tailored_jax.teacher.dataset import DatasetAnswers
from tailored_jax.teacher.client import ChatClient, ChatRequest, TeacherError
from tailored_jax.teacher.server import DEFAULT_MODEL, LocalTeacherServer
from tailored_jax.train.trainer import derive_seed


class RunStopped(Exception):
  """Raised when `stop_after` names the phase just completed (tests, staged runs)."""


class Run:
  """One run of the method in `workdir`; `run()` executes the phases not yet done."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, stop_after: str | None = None):
    config_lib.validate(cfg)
    self.cfg = cfg
    self.workdir = workdir
    self.layout = Layout(workdir)
    self.stop_after = stop_after
    storage.check_usable(workdir)
    storage.makedirs(workdir)
    self._check_config()
    self.state = wd.RunState(workdir)
    self.task = build_task(cfg.task)
    self.splits = self.task.splits()
    self.by_id: dict[str, Example] = {e.id: e for split in self.splits.values() for e in split}
    self.demos = self.task.demos()
    self.mesh = sharding.make_mesh(cfg)
    self.pretrained: Pretrained | None = (
        open_pretrained(cfg.model.init_from) if cfg.model.init_from else None
    )
    self.student: StudentRuntime | None = None  # built once the tokenizer exists (after prepare)
    self._server = None
    self._client = None
    self.metrics = Metrics.for_run(
        cfg.logging,
        self.layout.tensorboard,
        storage.name(storage.absolute(workdir)),
        json.loads(cfg.to_json()),
    )

  # ---- plumbing -------------------------------------------------------------------------------
  def _check_config(self) -> None:
    path = self.layout.config
    current = json.loads(self.cfg.to_json())
    if storage.exists(path):
      changed = config_lib.changed_fields(wd.read_json(path), current)
      if changed:
        raise config_lib.ConfigError(
            f"{path}: this workdir was made with a different config; fields changed: "
            f"{', '.join(changed)}. Use a new --workdir, or the same values."
        )
    wd.write_json(path, current)

  def _phase(self, name: str, fn, writer_only: bool = False) -> None:
    """Runs a phase not yet done; `writer_only` phases (teacher calls, preparing files) run on
    process 0 alone, the others on every process; all meet at a barrier afterwards."""
    if self.state.done(name):
      return
    preemption.stop_if_noticed(f"before phase {name}")
    logging.info("phase %s: start", name)
    start = time.time()
    try:
      if writer_only:
        error = None
        if wd.is_writer():
          try:
            fn()
          except BaseException as e:  # re-raised below, once the other processes know
            error = e
        if sharding.agree(error is not None):
          if error is not None:
            raise error
          raise RuntimeError(f"phase {name} failed on process 0; see its log")
      else:
        fn()
    except preemption.Preempted:  # what it did is kept (a checkpoint, the cache): so is its time
      self._add_seconds(name, time.time() - start)
      raise
    sharding.barrier(f"phase {name}")
    seconds = time.time() - start
    self._add_seconds(name, seconds)
    self.state.mark(name)
    kind, _, r = name.partition("_")
    self.metrics.scalars({f"phase_seconds/{kind}": seconds}, int(r or 0))
    self.metrics.sync()
    logging.info("phase %s: done in %.1fs", name, seconds)
    if self.stop_after == name:
      raise RunStopped(name)

  def _add_seconds(self, phase: str, seconds: float) -> None:
    """timings.json: each phase's wall time over every process that worked on it (a preempted
    attempt's too)."""
    timings = wd.read_json(self.layout.timings) if storage.exists(self.layout.timings) else {}
    timings[phase] = timings.get(phase, 0.0) + seconds
    wd.write_json(self.layout.timings, timings)

  @property
  def _teacher_on_devices(self) -> bool:
    """The teacher decodes on the run's mesh (an open model): its phases run on every process."""
    return self.cfg.teacher.kind == "open_model"

  def client(self) -> ChatClient:
    if self._client is None:
      t = self.cfg.teacher
      cache = ReplyCache(self.layout.teacher_cache, teacher_prompts.PROMPT_VERSION)
      if t.kind == "open_model":
        self._client = OpenModelTeacher(
            t.model_path,
            self.mesh,
            cache,
            batch_size=self.cfg.exam.batch_size,
            memory_budget_gb=self.cfg.exam.memory_budget_gb,
            seed=self.cfg.seed,
            decode_layout=self.cfg.mesh.decode_layout,
            continuous_batching=self.cfg.exam.continuous_batching,
        )
        return self._client
      if t.kind in ("local", "dataset"):
        answer = (
            DatasetAnswers(self.splits["train"], f"task {self.cfg.task.name}")
            if t.kind == "dataset"
            else None
        )
        self._server = LocalTeacherServer(
            seed=self.cfg.seed,
            error_rate=t.local_error_rate,
            answer=answer,
            reply_delay_s=t.local_reply_delay_s,
        )
        base_url, model, api_key = self._server.start(), DEFAULT_MODEL, ""
      elif t.kind == "replay":  # answers from a recording alone; nothing is sent anywhere
        cache = ReplyCache(t.replay_from, teacher_prompts.PROMPT_VERSION, read_only=True)
        models = cache.models()
        model = models[0] if len(models) == 1 else t.model
        base_url, api_key = "http://replay.invalid/v1", ""
      else:
        model = t.model
        base_url, key_env = config_lib.teacher_endpoint(t)
        api_key = read_api_key(t.api_key_file, key_env)
      self._client = ChatClient(
          base_url,
          model,
          api_key=api_key,
          cache=cache,
          max_concurrency=t.max_concurrency,
          max_retries=t.max_retries,
          timeout_s=t.timeout_s,
          backoff_s=t.backoff_s,
          requests_per_minute=t.requests_per_minute,
          supports_n=t.supports_n,
          max_requests=t.max_requests,
          connect_timeout_s=t.connect_timeout_s,
          replay_only=t.kind == "replay",
          tokens_per_minute=t.tokens_per_minute,
          max_total_tokens=t.max_total_tokens,
          max_cost=t.max_cost,
          price=config_lib.parse_prices(t.prices).get(model),
          protocol="anthropic" if t.kind == "anthropic" else "openai",
          mode=t.mode,
          batch_options=BatchOptions(
              poll_s=t.batch_poll_s,
              deadline_s=t.batch_deadline_h * 3600,
              retries=t.batch_retries,
              max_lines=t.batch_max_lines,
              discount=t.batch_discount,
          ),
          batch_manifest=self.layout.teacher_batches,
      )
    return self._client

  def close(self) -> None:
    self.metrics.close()
    if isinstance(self._client, OpenModelTeacher):
      self._client.release()
      self._client = None
    if self._server is not None:
      self._server.stop()
      self._server = None
      self._client = None

  # ---- the loop -------------------------------------------------------------------------------
  def run(self) -> list[dict]:
    try:
      self._phase("prepare", self.prepare, writer_only=True)
      self.student = StudentRuntime(self.cfg, self.layout, self.mesh, self.pretrained)
      if config_lib.initial_eval(self.cfg):
        self._phase("evaluate_0", lambda: self.evaluate(0))
        self._write_round_metrics(0)
      star = self.cfg.teacher.kind == "self"
      if star:  # STaR: round 1's data are the initial student's own right answers
        self._phase("exam_0", lambda: self.exam(0))
      self._phase("annotate", self.annotate, writer_only=not self._teacher_on_devices)
      if not star and config_lib.initial_exam(self.cfg) and self.cfg.method.self_reflection:
        self._phase("exam_0", lambda: self.exam(0))
      for r in range(1, self.cfg.rounds + 1):
        if r > 1:
          self._write_round_metrics(r - 1)  # its exam and feedback are done now
        self._phase(f"train_{r}", lambda: self.train(r))
        self._phase(f"evaluate_{r}", lambda: self.evaluate(r))
        if self._stopped(r, self._plateau(r)):
          break
        if r < self.cfg.rounds and (self.cfg.method.feedback or self.cfg.method.self_reflection):
          self._phase(f"exam_{r}", lambda: self.exam(r))
          if self._stopped(r, self._few_mistakes(r)):
            break
          if self.cfg.method.feedback:
            self._phase(
                f"feedback_{r}", lambda: self.feedback(r), writer_only=not self._teacher_on_devices
            )
      records = summary.records(self.layout, self.state, self.cfg.rounds)
      if wd.is_writer():
        summary.write(self.layout, records)
      if records:
        self._write_round_metrics(records[-1]["round"], records)
      return records
    finally:
      self.close()

  def _write_round_metrics(self, r: int, records: list[dict] | None = None) -> None:
    """Round r's summary record as round/* scalars, and what its teacher calls cost."""
    records = records or summary.records(self.layout, self.state, r)
    record = next((x for x in records if x["round"] == r), None)
    if record is None:
      return
    t = self.cfg.teacher
    price = config_lib.parse_prices(t.prices).get(t.model)
    self.metrics.round_record(
        record, summary.teacher_cost_usd(self.layout, r, price, t.batch_discount)
    )

  # ---- the stop rule (`rounds` is then a maximum) ---------------------------------------------
  def _plateau(self, r: int) -> str | None:
    patience = self.cfg.method.stop_patience
    if not patience:
      return None
    vals = [wd.read_json(self.layout.eval_report(i))["val"]["accuracy"] for i in range(1, r + 1)]
    return summary.plateau(vals, patience)

  def _few_mistakes(self, r: int) -> str | None:
    least = self.cfg.method.stop_min_mistakes
    found = wd.read_json(self.layout.exam_report(r))["mistakes"]
    if least and found < least:
      return (
          f"the exam after round {r} found {found} mistakes, fewer than "
          f"method.stop_min_mistakes={least}"
      )
    return None

  def _stopped(self, r: int, reason: str | None) -> bool:
    """Records why the run ends after round r (a pure function of the workdir, so a resumed run
    stops at the same place)."""
    if reason is None:
      return False
    logging.info("stopping after round %d: %s", r, reason)
    wd.write_json(self.layout.stop, {"round": r, "reason": reason})
    return True

  def prepare(self) -> None:
    for split, examples in self.splits.items():
      wd.write_jsonl(
          self.layout.data(split),
          [{"id": e.id, "question": e.question, "gold": e.gold} for e in examples],
      )
    if self.pretrained is not None:
      tokenizer = self.pretrained.tokenizer
      if self.cfg.model.add_pad_token and vocab.needs_pad(tokenizer):
        tokenizer = vocab.add_pad_token(tokenizer)
    elif self.cfg.tokenizer.path:
      tokenizer = Tokenizer.load(self.cfg.tokenizer.path)
    else:
      corpus = [
          self.task.format_prefix(d.question, self.demos)
          + self.task.format_continuation(d.question, d.rationale, d.answer)
          for d in self.task.tokenizer_corpus() + self.demos
      ]
      tokenizer = train_bpe(corpus, self.cfg.tokenizer.vocab_size)
    tokenizer.save(self.layout.tokenizer)

  def _keep_correct(
      self,
      example: Example,
      texts: list[str],
      source: str,
      round_index: int,
      seen: set[str],
      counts: dict,
      mistake: str = "",
      finish_reasons: list[str] | None = None,
  ) -> list[dict]:
    """Teacher replies whose answer is right, in training form; counts why others were dropped
    (cut at max_tokens: truncated; withheld by the provider: content_filter; unparseable, wrong
    answer, duplicate). Feedback records also keep the student's wrong rationale and the
    teacher's feedback line."""
    kept = []
    for text, reason in zip(texts, finish_reasons or ["stop"] * len(texts)):
      dropped = {"length": "truncated", "content_filter": "content_filter"}.get(reason)
      if dropped:
        counts[dropped] = counts.get(dropped, 0) + 1
        continue
      reply = teacher_prompts.parse_reply(text)
      if not reply.rationale or reply.answer is None:
        counts["unparseable"] = counts.get("unparseable", 0) + 1
        continue
      continuation = self.task.format_continuation(example.question, reply.rationale, reply.answer)
      record = scoring.score_output(self.task, example, continuation)
      if not record["correct"]:
        counts["wrong_answer"] = counts.get("wrong_answer", 0) + 1
        continue
      if reply.rationale in seen:
        counts["duplicate"] = counts.get("duplicate", 0) + 1
        continue
      seen.add(reply.rationale)
      record = {
          "qid": example.id,
          "continuation": self.task.format_continuation(
              example.question, reply.rationale, example.gold
          ),
          "source": source,
          "round": round_index,
      }
      if mistake:
        record.update(student_output=mistake, feedback=reply.feedback)
      kept.append(record)
    return kept

  def _ask_teacher(self, requests: list[ChatRequest], label: str):
    start = time.time()
    with Progress(label, len(requests), "requests") as progress:
      results, usage = self.client().run(
          requests,
          on_reply=lambda i, reply: progress.update(
              1, tokens=reply.prompt_tokens + reply.completion_tokens
          ),
          label=label,
      )
    failures = [r for r in results if isinstance(r, TeacherError)]
    logging.info(
        "%s: %d requests paid, %d from cache, %d tokens, %d retries, %.1fs",
        label,
        usage.requests,
        usage.cache_hits,
        usage.tokens,
        usage.retries,
        time.time() - start,
    )
    if failures:
      raise TeacherError(
          f"{label}: {len(failures)} of {len(requests)} teacher requests failed "
          f"(replies received so far are cached; re-run to retry). First: "
          f"{failures[0]}"
      )
    return results, usage

  def annotate(self) -> None:
    if self.cfg.task.format == "answer_only":
      return self._gold_answers()
    if self.cfg.teacher.kind == "self":
      return self._own_data(0, "annotate")
    t = self.cfg.teacher
    train = self.splits["train"]
    requests = [
        ChatRequest(
            teacher_prompts.annotation_messages(e.question, self.demos, self.task.format),
            n=t.num_rationales,
            temperature=t.temperature,
            max_tokens=t.max_tokens,
            tag=f"annotate-{e.id}",
        )
        for e in train
    ]
    results, usage = self._ask_teacher(requests, "annotate")
    data, counts = [], {}
    for example, reply in zip(train, results):
      data.extend(
          self._keep_correct(
              example,
              reply.texts,
              "annotation",
              1,
              set(),
              counts,
              finish_reasons=reply.finish_reasons,
          )
      )
    wd.write_jsonl(self.layout.teacher_data(1), data)
    wd.write_json(
        self.layout.teacher_report(1),
        {
            "phase": "annotate",
            "usage": usage.as_dict(),
            "kept": len(data),
            "dropped": counts,
            "questions": len(train),
            "questions_with_two_rationales": _count_questions_with(data, 2),
            "prompt_version": teacher_prompts.PROMPT_VERSION,
        },
    )

  def _gold_answers(self) -> None:
    """D_1 of the answer-only baseline: each train question with its gold answer; no teacher."""
    train = self.splits["train"]
    data = [
        {
            "qid": e.id,
            "continuation": self.task.format_continuation(e.question, "", e.gold),
            "source": "gold_answer",
            "round": 1,
        }
        for e in train
    ]
    wd.write_jsonl(self.layout.teacher_data(1), data)
    wd.write_json(
        self.layout.teacher_report(1),
        {"phase": "annotate", "usage": {}, "kept": len(data), "questions": len(train)},
    )

  def exam(self, round_index: int) -> None:
    """k sampled rationales per train question; distinct wrong ones are the round's mistakes.
    With feedback to follow, each decoded batch's mistakes go to the teacher at once
    (`_feedback_stream`), so its replies arrive while the exam decodes."""
    e = self.cfg.exam
    train = self.splits["train"]
    params = self.student.params(round_index)
    self.student.trainer.check_finite_params(params, f"round {round_index}, before the exam")
    prompts = [self.task.format_prefix(x.question, self.demos) for x in train]
    sampling = SamplingConfig(e.temperature, e.top_k, e.top_p)
    stream = self._feedback_stream(round_index)
    try:
      outputs = generate_texts(
          self.student.decoder,
          self.student.decode_params(round_index),
          self.student.tokenizer,
          prompts,
          mesh=self.mesh,
          num_samples=e.num_samples,
          sampling=sampling,
          max_new_tokens=e.max_new_tokens,
          batch_size=e.batch_size,
          rng=jax.random.PRNGKey(self.cfg.seed * 1000 + round_index),
          label=f"exam {round_index}",
          decode_layout=self.student.decode_layout,
          memory_budget_bytes=int(e.memory_budget_gb * 2**30),
          continuous=e.continuous_batching,
          on_batch=stream
          and (
              lambda indices, samples: stream.add(
                  [m for i, s in zip(indices, samples) for m in self._mistakes_of(train[i], s)[0]]
              )
          ),
      )
    finally:
      if stream is not None:
        stream.close()
    mistakes, outcomes, correct_samples, always_right = [], [], 0, 0
    for example, samples in zip(train, outputs):
      found, wrong_here, right_here = self._mistakes_of(example, samples)
      mistakes += found
      correct_samples += right_here
      always_right += wrong_here == 0
      outcomes.append({"qid": example.id, "samples": len(samples), "wrong": wrong_here})
    if self.cfg.teacher.kind == "self":
      self._own_rationales(round_index, train, outputs)
    wd.write_jsonl(self.layout.exam_outcomes(round_index), outcomes)
    wd.write_jsonl(self.layout.mistakes(round_index), mistakes)
    wd.write_json(
        self.layout.exam_report(round_index),
        {
            "questions": len(train),
            "samples": len(train) * e.num_samples,
            "correct_samples": correct_samples,
            "questions_always_right": always_right,
            "mistakes": len(mistakes),
            **({"feedback_stream": stream.record()} if stream is not None else {}),
        },
    )

  def _own_rationales(self, round_index: int, train: list[Example], outputs) -> None:
    """STaR's data after exam r: each question's distinct right rationales among its samples;
    for a question with none, rationalization (`teacher.star_rationalize`): the student asked
    again with the gold answer as a hint in the question, its right rationales kept without the
    hint. Written to round_r/own_rationales.jsonl for the teacher phase that follows."""
    kept = []
    unanswered = []
    for example, samples in zip(train, outputs):
      found = self._right_rationales(example, samples, "")
      kept += [{"qid": example.id, "rationale": r, "source": "self"} for r in found]
      if not found:
        unanswered.append(example)
    if unanswered and self.cfg.teacher.star_rationalize:
      e = self.cfg.exam
      hints = [_hint(x.gold) for x in unanswered]
      retried = generate_texts(
          self.student.decoder,
          self.student.decode_params(round_index),
          self.student.tokenizer,
          [
              self.task.format_prefix(f"{x.question.rstrip()} {hint}", self.demos)
              for x, hint in zip(unanswered, hints)
          ],
          mesh=self.mesh,
          num_samples=1,
          sampling=SamplingConfig(e.temperature, e.top_k, e.top_p),
          max_new_tokens=e.max_new_tokens,
          batch_size=e.batch_size,
          rng=jax.random.PRNGKey(self.cfg.seed * 1000 + round_index + 500_000),
          label=f"rationalization {round_index}",
          decode_layout=self.student.decode_layout,
          memory_budget_bytes=int(e.memory_budget_gb * 2**30),
          continuous=e.continuous_batching,
      )
      for example, hint, samples in zip(unanswered, hints, retried):
        found = self._right_rationales(example, samples, hint)
        kept += [{"qid": example.id, "rationale": r, "source": "rationalization"} for r in found]
    wd.write_jsonl(self.layout.own_rationales(round_index), kept)

  def _right_rationales(self, example: Example, samples: list[str], hint: str) -> list[str]:
    """The distinct rationales of `samples` that reach the gold answer, the hint's words gone."""
    out = []
    for text in samples:
      record = scoring.score_output(self.task, example, text)
      rationale = _without_hint(record["rationale"].split("\nAnswer:")[0], hint)  # no answer line
      if record["correct"] and rationale.strip() and rationale not in out:
        out.append(rationale)
    return out

  def _own_data(self, exam_round: int, phase: str) -> None:
    """D_{r+1} of STaR: exam r's own right rationales (at most teacher.num_rationales per
    question), in training form; no teacher is asked."""
    own = wd.read_jsonl(self.layout.own_rationales(exam_round))
    per_question = collections.Counter()
    data = []
    for record in own:
      if per_question[record["qid"]] >= self.cfg.teacher.num_rationales:
        continue
      per_question[record["qid"]] += 1
      example = self.by_id[record["qid"]]
      data.append(
          {
              "qid": example.id,
              "continuation": self.task.format_continuation(
                  example.question, record["rationale"], example.gold
              ),
              "source": record["source"],
              "round": exam_round + 1,
          }
      )
    wd.write_jsonl(self.layout.teacher_data(exam_round + 1), data)
    wd.write_json(
        self.layout.teacher_report(exam_round + 1),
        {
            "phase": phase,
            "usage": {},
            "kept": len(data),
            "sources": dict(collections.Counter(d["source"] for d in data)),
            "questions": len(per_question),
        },
    )

  def _mistakes_of(self, example: Example, samples: list[str]) -> tuple[list[dict], int, int]:
    """A question's mistakes (its distinct wrong rationales, at most
    teacher.max_mistakes_per_question), wrong samples and right samples."""
    mistakes, seen, wrong, right = [], set(), 0, 0
    for text in samples:
      record = scoring.score_output(self.task, example, text)
      if record["correct"]:
        right += 1
        continue
      wrong += 1
      negative = record["rationale"]
      if (
          negative.strip()
          and negative not in seen
          and len(seen) < self.cfg.teacher.max_mistakes_per_question
      ):
        seen.add(negative)
        mistakes.append(
            {
                "qid": example.id,
                "output": negative,
                "answer": record["answer"],
                "error": record["error"],
            }
        )
    return mistakes, wrong, right

  def _feedback_stream(self, round_index: int) -> "_FeedbackStream | None":
    """Where the exam's mistakes go as they are found: the teacher, when this exam's feedback
    phase will follow (sync mode, process 0; batch mode waits for the whole phase)."""
    c = self.cfg
    if not (
        c.teacher.stream_feedback
        and c.method.feedback
        and c.teacher.mode == "sync"
        and round_index >= 1
        and round_index < c.rounds
        and c.task.format != "answer_only"
        and c.teacher.kind not in ("self", "open_model")
        and wd.is_writer()
    ):
      return None
    return _FeedbackStream(self, round_index, c.method.stop_min_mistakes)

  def _feedback_requests(self, round_index: int, mistakes: list[dict]) -> list[ChatRequest]:
    """One request per mistake, tagged (round, question, its n-th mistake) in mistakes order."""
    t = self.cfg.teacher
    nth = collections.Counter()
    requests = []
    for m in mistakes:
      example = self.by_id[m["qid"]]
      requests.append(
          ChatRequest(
              teacher_prompts.feedback_messages(
                  example.question, m["output"], example.gold, self.demos, self.task.format
              ),
              n=t.feedback_samples,
              temperature=t.temperature,
              max_tokens=t.max_tokens,
              tag=f"feedback_{round_index}-{m['qid']}-m{nth[m['qid']]}",
          )
      )
      nth[m["qid"]] += 1
    return requests

  def feedback(self, round_index: int) -> None:
    """Tailored rationales for round r's mistakes: the data D_{r+1}."""
    if self.cfg.teacher.kind == "self":
      return self._own_data(round_index, f"feedback_{round_index}")
    mistakes = wd.read_jsonl(self.layout.mistakes(round_index))
    requests = self._feedback_requests(round_index, mistakes)
    results, usage = self._ask_teacher(requests, f"feedback {round_index}")
    data, counts, seen_by_question = [], {}, {}
    for mistake, reply in zip(mistakes, results):
      seen = seen_by_question.setdefault(mistake["qid"], set())
      data.extend(
          self._keep_correct(
              self.by_id[mistake["qid"]],
              reply.texts,
              "feedback",
              round_index + 1,
              seen,
              counts,
              mistake=mistake["output"],
              finish_reasons=reply.finish_reasons,
          )
      )
    wd.write_jsonl(self.layout.teacher_data(round_index + 1), data)
    wd.write_json(
        self.layout.teacher_report(round_index + 1),
        {
            "phase": f"feedback_{round_index}",
            "usage": usage.as_dict(),
            "kept": len(data),
            "dropped": counts,
            "mistakes": len(mistakes),
            "prompt_version": teacher_prompts.PROMPT_VERSION,
        },
    )

  def training_data(self, round_index: int) -> list[dict]:
    first = 1 if self.cfg.method.accumulate_data else round_index
    data = []
    for r in range(first, round_index + 1):
      path = self.layout.teacher_data(r)
      if storage.exists(path):
        data.extend(wd.read_jsonl(path))
    return data

  def train(self, round_index: int) -> None:
    c = self.cfg
    params_dir = self.layout.params_dir(round_index)
    checkpoint_dir = self.layout.step_dir(round_index)
    trained = storage.exists(self.layout.train_report(round_index))
    if trained and storage.is_dir(params_dir):
      if wd.is_writer():  # killed after saving: nothing to redo
        storage.remove_tree(checkpoint_dir)
      return
    data = self.training_data(round_index)
    if not data and c.teacher.kind == "self":
      return self._keep_untrained(round_index)
    if not data:
      raise RuntimeError(
          f"round {round_index}: no teacher data to train on (see round_*/teacher.json)"
      )
    negatives: dict[str, list[str]] = {}
    mistakes_path = self.layout.mistakes(round_index - 1)
    if c.method.self_reflection and storage.exists(mistakes_path):
      for m in wd.read_jsonl(mistakes_path):
        negatives.setdefault(m["qid"], []).append(m["output"])
    qids = sorted({d["qid"] for d in data})
    prefixes = {q: self.task.format_prefix(self.by_id[q].question, self.demos) for q in qids}
    batcher = Batcher(
        self.student.tokenizer,
        prefixes,
        [TrainExample(d["qid"], d["continuation"]) for d in data],
        negatives,
        batch_size=c.train.batch_size,
        max_seq_len=c.train.max_seq_len,
        max_continuation_len=c.train.max_continuation_len,
        prefix_weight=c.train.prefix_weight,
        max_positives=c.train.max_positives,
        max_negatives=c.train.max_negatives,
        sr_batch_size=c.train.sr_batch_size,
        seed=derive_seed(c.seed, round_index, 2),
        length_bucket=c.train.length_bucket,
        sr_reuse_lm_forward=c.train.sr_reuse_lm_forward,
    )
    trainer = self.student.trainer
    start_params = self.student.params(round_index - 1)
    carried = None
    if not c.method.fresh_optimizer and round_index > 1:
      carried = trainer.restore_carry(self.layout.optimizer_dir(round_index - 1), start_params)
    earlier_steps = sum(
        wd.read_json(self.layout.train_report(r))["steps"]
        for r in range(1, round_index)
        if storage.exists(self.layout.train_report(r))
    )
    state, metrics = trainer.train_round(
        start_params,
        batcher,
        seed=c.seed,
        round_index=round_index,
        checkpoint_dir=checkpoint_dir,
        state=carried,
        metrics=self.metrics,
        step_offset=earlier_steps,
    )
    params = state.params
    trainer.check_finite_params(params, f"round {round_index} after training")
    if not c.method.fresh_optimizer:
      # Saved before the params: a round counts as trained once its params exist.
      checkpointing.save_params(
          self.layout.optimizer_dir(round_index), trainer.optimizer_carry(state)
      )
    checkpointing.save_params(params_dir, params)
    self.student.hold(round_index, params)
    wd.write_json(
        self.layout.train_report(round_index),
        dict(
            metrics,
            examples=len(data),
            questions=len(qids),
            negatives=sum(len(v) for v in negatives.values()),
        ),
    )
    sharding.barrier(f"saved round {round_index}")
    if wd.is_writer():
      storage.remove_tree(checkpoint_dir)

  def _keep_untrained(self, round_index: int) -> None:
    """STaR with no right answer to learn from (a student that solves nothing yet): round r's
    weights are round r-1's, and train.json says no step was taken."""
    logging.warning(
        "round %d: the student answered nothing right, so STaR has nothing to learn from; "
        "its weights stay as they were",
        round_index,
    )
    params = self.student.params(round_index - 1)
    checkpointing.save_params(self.layout.params_dir(round_index), params)
    self.student.hold(round_index, params)
    wd.write_json(
        self.layout.train_report(round_index),
        {"steps": 0, "examples": 0, "questions": 0, "negatives": 0},
    )
    sharding.barrier(f"saved round {round_index}")

  def evaluate(self, round_index: int) -> None:
    """Greedy answers for every evaluation split, decoded in one call (one set of batches or
    slots for all: a split's last rows do not run alone), scored per split."""
    params = self.student.decode_params(round_index)
    splits = [s.strip() for s in self.cfg.eval.splits.split(",") if s.strip()]
    examples = [(split, x) for split in splits for x in self.splits[split]]
    outputs = generate_texts(
        self.student.decoder,
        params,
        self.student.tokenizer,
        [self.task.format_prefix(x.question, self.demos) for _, x in examples],
        mesh=self.mesh,
        num_samples=1,
        sampling=SamplingConfig(),
        max_new_tokens=self.task.max_new_tokens,
        batch_size=self.cfg.eval.batch_size,
        rng=jax.random.PRNGKey(0),
        label=f"evaluate {round_index} ({', '.join(splits)})",
        decode_layout=self.student.decode_layout,
        memory_budget_bytes=int(self.cfg.exam.memory_budget_gb * 2**30),
        continuous=self.cfg.exam.continuous_batching,
    )
    results = {}
    for split in splits:
      mine = [(x, o[0]) for (name, x), o in zip(examples, outputs) if name == split]
      records, summary_ = scoring.score(self.task, [x for x, _ in mine], [o for _, o in mine])
      wd.write_jsonl(self.layout.eval_records(round_index, split), records)
      results[split] = summary_
      logging.info(
          "round %d %s accuracy: %.3f (%d/%d)",
          round_index,
          split,
          summary_["accuracy"],
          summary_["correct"],
          summary_["total"],
      )
    wd.write_json(self.layout.eval_report(round_index), results)


def _hint(gold: str) -> str:
  """STaR's rationalization hint, appended to the question."""
  return f"(Hint: the answer is {gold}.)"


def _without_hint(rationale: str, hint: str) -> str:
  """A rationalized rationale as if no hint had been given: the hint, and any line that
  mentions one, removed."""
  if not hint:
    return rationale
  text = rationale.replace(hint, "")
  return "\n".join(line for line in text.split("\n") if "hint" not in line.lower()).strip()


class _FeedbackStream:
  """The exam's mistakes sent to the teacher batch by batch (`ChatClient.stream`: bounded,
  the teacher's concurrency limit unchanged); the feedback phase then reads the replies from
  the cache, in the sequential order. With `method.stop_min_mistakes`, nothing goes before the
  exam has found that many (the stop rule could otherwise end the run with feedback paid)."""

  def __init__(self, run: Run, round_index: int, hold_until: int):
    self.run, self.round_index, self.hold_until = run, round_index, hold_until
    self.stream = run.client().stream()
    self.held: list[dict] = []
    self.sent = 0
    self.first_sent = self.decode_end = self.closed = None

  def add(self, mistakes: list[dict]) -> None:
    """A decode batch's mistakes (each question's all in one batch, so the tags' per-question
    counts are those of the whole mistakes file)."""
    self.held += mistakes
    if len(self.held) < self.hold_until:
      return
    for request in self.run._feedback_requests(self.round_index, self.held):
      self.first_sent = self.first_sent or time.time()
      self.stream.submit(request)
      self.sent += 1
    self.held, self.hold_until = [], 0

  def decoded(self) -> None:
    self.decode_end = time.time()

  def close(self) -> None:
    self.stream.close()
    self.closed = time.time()

  def record(self) -> dict:
    """For the exam report: requests sent while decoding, the teacher's time hidden behind the
    decoding (from the first request to the exam's last batch: what the feedback phase no
    longer waits), and the wait for the last replies after it."""
    overlap = 0.0
    if self.first_sent is not None and self.decode_end is not None:
      overlap = max(0.0, self.decode_end - self.first_sent)
    wait = (self.closed - self.decode_end) if self.decode_end and self.closed else 0.0
    return {
        "requests": self.sent,
        "overlap_s": round(overlap, 2),
        "wait_after_decoding_s": round(wait, 2),
    }


def _count_questions_with(data: list[dict], at_least: int) -> int:
  counts: dict[str, int] = {}
  for d in data:
    counts[d["qid"]] = counts.get(d["qid"], 0) + 1
  return sum(1 for v in counts.values() if v >= at_least)


def run(cfg: ml_collections.ConfigDict, workdir: str, stop_after: str | None = None) -> list[dict]:
  return Run(cfg, workdir, stop_after).run()
