"""The round loop end to end on a tiny config, and resumption after kills between and mid-phase."""

import json
import os

import pytest

from tailored_jax import config_lib, rounds
from tailored_jax.teacher.client import ChatClient
from tailored_jax.train.trainer import Trainer
from tests.shared_data import DATA


class SimulatedKill(Exception):
  """Stands for a kill inside the teacher's event loop (a real KeyboardInterrupt raised inside
  an asyncio task can surface later, at a random point of the test session)."""


def tiny_config():
  c = config_lib.base_config()
  c.rounds = 2
  c.task.synthetic.update(num_train=16, num_val=8, num_test=8, max_steps=2)
  c.task.max_new_tokens = 24
  c.tokenizer.vocab_size = 300
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
  c.mesh.num_devices = 1
  c.train.update(
      batch_size=8,
      epochs=2,
      lr=3e-3,
      warmup_steps=2,
      grad_clip=1.0,
      checkpoint_every_steps=3,
      log_every_steps=4,
  )
  c.exam.update(num_samples=2, max_new_tokens=24, batch_size=16)
  c.eval.batch_size = 8
  c.teacher.update(num_rationales=2, backoff_s=0.0)
  c.teacher.local_error_rate = 0.2
  return c


def read(workdir, *parts):
  path = os.path.join(workdir, *parts)
  with open(path) as f:
    return f.read()


def cache_lines(workdir):
  return len(read(workdir, "teacher_cache.jsonl").splitlines())


def cache_keys(workdir) -> tuple[list[str], list[str]]:
  """The reply cache's keys: of its replies, and of its charge records (attempts billed whose
  replies were lost, e.g. in flight at a kill)."""
  entries = [json.loads(line) for line in read(workdir, "teacher_cache.jsonl").splitlines()]
  return (
      sorted(e["key"] for e in entries if "charge" not in e),
      sorted(e["key"] for e in entries if "charge" in e),
  )


def test_end_to_end_outputs(reference):
  workdir, records = reference
  assert [r["round"] for r in records] == [1, 2]
  assert set(records[0]) == {
      "round",
      "train_examples",
      "optimizer_steps",
      "mistakes",
      "teacher_requests",
      "teacher_tokens",
      "mistakes_fixed",
      "mistakes_persistent",
      "mistakes_new",
      "teacher_rejected",
      "stop_reason",
      "val_accuracy",
      "test_accuracy",
      "seconds",
  }
  assert records[0]["teacher_requests"] == 16 and records[0]["mistakes"] == 0
  annotate = json.loads(read(workdir, "round_1", "teacher.json"))
  assert annotate["usage"]["requests"] == 16
  # local_error_rate=0.2: some teacher rationales are wrong and must have been dropped
  assert annotate["dropped"].get("wrong_answer", 0) > 0
  assert annotate["kept"] + sum(annotate["dropped"].values()) == 32
  assert records[0]["train_examples"] == annotate["kept"]
  exam = json.loads(read(workdir, "round_1", "exam.json"))
  assert records[1]["mistakes"] == exam["mistakes"] > 0
  feedback = json.loads(read(workdir, "round_2", "teacher.json"))
  assert feedback["mistakes"] == exam["mistakes"] == records[1]["teacher_requests"]
  assert records[1]["train_examples"] == annotate["kept"] + feedback["kept"]
  train2 = json.loads(read(workdir, "round_2", "train.json"))
  assert train2["self_reflection"] and train2["negatives"] == exam["mistakes"]
  assert json.loads(read(workdir, "state.json"))["last_completed"] == "evaluate_2"
  assert json.loads(read(workdir, "summary.json")) == records
  best = json.loads(read(workdir, "best_round.json"))
  by_val = max(records, key=lambda r: (r["val_accuracy"], r["round"]))
  assert best["round"] == by_val["round"]
  assert best["checkpoint"] == f"checkpoints/round_{best['round']}"
  assert os.path.getsize(os.path.join(workdir, "summary.png")) > 1000
  for r in records:
    assert 0.0 <= r["test_accuracy"] <= 1.0


def test_resume_after_kill_between_phases(reference, tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(rounds.RunStopped):
    rounds.run(tiny_config(), workdir, stop_after="exam_1")
  paid_before = cache_lines(workdir)
  records = rounds.run(tiny_config(), workdir)
  assert records == [dict(r, seconds=r2["seconds"]) for r, r2 in zip(reference[1], records)]
  assert cache_lines(workdir) == cache_lines(reference[0])  # no teacher call paid twice
  assert paid_before == cache_lines(reference[0])  # the feedback was streamed during the exam
  assert read(workdir, "round_2", "eval_test.jsonl") == read(
      reference[0], "round_2", "eval_test.jsonl"
  )


def test_resume_after_kill_mid_training_and_mid_teacher(reference, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  cfg = tiny_config()
  cfg.teacher.stream_feedback = False  # the feedback phase pays (a kill mid-feedback)
  real_step_fn = Trainer.step_fn
  calls = {"n": 0}

  def dying_step_fn(self):
    fn = real_step_fn(self)

    def step(state, lm, reflection, *reference):
      calls["n"] += 1
      if calls["n"] == 5:  # round 1, after the checkpoint at step 3
        raise KeyboardInterrupt("killed mid-training")
      return fn(state, lm, reflection, *reference)

    return step

  monkeypatch.setattr(Trainer, "step_fn", dying_step_fn)
  with pytest.raises(KeyboardInterrupt):
    rounds.run(cfg, workdir)
  assert json.loads(read(workdir, "state.json"))["last_completed"] == "annotate"
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "train_round_1", "3"))
  monkeypatch.setattr(Trainer, "step_fn", real_step_fn)

  real_run = ChatClient.run

  def dying_run(self, requests, on_reply=None, label=""):

    def reply_then_die(i, reply):
      if len(self.cache) >= 16 + 3:  # three feedback replies paid, then the kill
        raise SimulatedKill("killed mid-feedback")
      if on_reply:
        on_reply(i, reply)

    return real_run(self, requests, reply_then_die, label)

  monkeypatch.setattr(ChatClient, "run", dying_run)
  with pytest.raises(SimulatedKill):
    rounds.run(cfg, workdir)
  assert json.loads(read(workdir, "state.json"))["last_completed"] == "exam_1"
  assert cache_lines(workdir) >= 16 + 3
  monkeypatch.setattr(ChatClient, "run", real_run)

  records = rounds.run(cfg, workdir)
  replies, charged = cache_keys(workdir)
  assert replies == cache_keys(reference[0])[0]  # every reply kept, none paid into it twice
  # requests in flight at the kill (how many depends on timing) are charged, then paid on resume
  assert set(charged) <= set(replies)
  train1 = json.loads(read(workdir, "round_1", "train.json"))
  assert train1["resumed_at_step"] == 3
  assert [dict(r, seconds=0) for r in records] == [dict(r, seconds=0) for r in reference[1]]
  assert read(workdir, "round_2", "eval_test.jsonl") == read(
      reference[0], "round_2", "eval_test.jsonl"
  )


def test_a_kill_while_the_exam_streams_feedback_resumes_exactly(reference, tmp_path, monkeypatch):
  """Exam batches of 4 questions: each batch's mistakes go to the teacher as it is decoded. A
  kill after the third request was handed over; the resumed run decodes the exam again (the
  same samples: keys per question and sample, whatever the batch size), pays only what was not
  cached, and ends with the reference (sequential) run's records and teacher data."""
  from tailored_jax.teacher.client import Stream

  cfg = tiny_config()
  cfg.exam.batch_size = 4
  workdir = str(tmp_path)
  real_submit, real_add = Stream.submit, rounds._FeedbackStream.add
  handed, pieces = [], []

  def dying_submit(self, request):
    handed.append(request.tag)
    if len(handed) == 4:
      raise SimulatedKill("killed while the exam streams")
    real_submit(self, request)

  def counting_add(self, mistakes):
    pieces.append(len(mistakes))
    real_add(self, mistakes)

  monkeypatch.setattr(Stream, "submit", dying_submit)
  monkeypatch.setattr(rounds._FeedbackStream, "add", counting_add)
  with pytest.raises(SimulatedKill):
    rounds.run(cfg, workdir)
  assert json.loads(read(workdir, "state.json"))["last_completed"] == "evaluate_1"
  monkeypatch.setattr(Stream, "submit", real_submit)
  records = rounds.run(cfg, workdir)
  assert sum(1 for n in pieces if n) >= 2  # streamed batch by batch
  exam = json.loads(read(workdir, "round_1", "exam.json"))
  assert exam["feedback_stream"]["requests"] == exam["mistakes"]
  from tailored_jax import report

  report.main(["--workdir", workdir])
  assert f"round 1: {exam['mistakes']} requests, " in read(workdir, "report.md")
  assert cache_lines(workdir) == cache_lines(reference[0])  # nothing paid twice
  strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
  assert strip(records) == strip(reference[1])
  assert read(workdir, "round_2", "teacher_data.jsonl") == read(
      reference[0], "round_2", "teacher_data.jsonl"
  )


def test_changed_config_on_resume_is_refused(reference):
  c = tiny_config()
  c.train.lr = 1e-4
  with pytest.raises(config_lib.ConfigError, match=r"fields changed: train.lr"):
    rounds.run(c, reference[0])


def test_export_round_checkpoint_loads_in_transformers(reference, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import numpy as np
  from tailored_jax import export
  from tailored_jax.generate import generate
  from tailored_jax.student_io.student import load_student
  from tailored_jax.sample.sampling import SamplingConfig

  checkpoint = os.path.join(reference[0], "checkpoints", "round_2")
  export.export(checkpoint, str(tmp_path))
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
  student = load_student(checkpoint)
  prompt = "Question: Ava has 7 pens. Ava buys 5 more pens. How many pens does Ava have now?"
  ids = student.tokenizer.encode(prompt)
  assert ids == tokenizer(prompt).input_ids and ids[0] == tokenizer.bos_token_id
  with torch.no_grad():
    expected = model(torch.tensor([ids])).logits[0].numpy()
  got, _, _ = student.model.apply(
      {"params": student.params},
      np.asarray([ids], np.int32),
      np.arange(len(ids))[None],
      np.ones((1, len(ids)), bool),
  )
  assert np.abs(np.asarray(got[0]) - expected).max() <= 1e-4
  with torch.no_grad():
    greedy = model.generate(
        torch.tensor([ids]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
  tokens, _ = generate(student, prompt, 12, SamplingConfig())
  assert tokens == greedy


def tiny_gptj_source(cfg, tmp_path):
  """A random tiny GPT-J saved as an HF directory with a BPE tokenizer of the task (no pad)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tailored_jax.data.tasks import build_task
  from tailored_jax.data.tokenizer import train_bpe

  task = build_task(cfg.task)
  tok = train_bpe(
      [
          task.format_prefix(d.question, [])
          + task.format_continuation(d.question, d.rationale, d.answer)
          for d in task.tokenizer_corpus()
      ],
      300,
  )
  source = tmp_path / "gptj"
  torch.manual_seed(0)
  model = transformers.GPTJForCausalLM(
      transformers.GPTJConfig(
          vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=256
      )
  )
  model.save_pretrained(source)
  tok.backend.save(str(source / "tokenizer.json"))
  (source / "tokenizer_config.json").write_text(
      json.dumps(
          {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
      )
  )
  return source, tok


def test_round_from_a_pretrained_gptj_without_pad_token(tmp_path):
  """init_from an HF directory: tokenizer from the source, a pad token added (one more embedding
  row; its mean initialisation is checked below), weights streamed in; the pretrained student is
  examined before round 1 (N_0, on by default with init_from) and, with fresh_optimizer off,
  round 2 continues round 1's AdamW state and schedule. As in the paper configs, the layers
  run under a scan with full remat: the loaded per-layer weights are stacked, decoding reads
  them unstacked, and the stacked round checkpoint loads back as a per-layer student; the
  triplet loss reuses the LM forward."""
  from tailored_jax.student_io.student import load_student

  cfg = tiny_config()
  cfg.method.fresh_optimizer = False
  cfg.model.update(scan_layers=True, remat="full")
  cfg.train.length_bucket = 8  # each batch padded to its own longest string
  cfg.train.sr_reuse_lm_forward = True  # the triplet's anchor and prefix from the LM forward
  source, tok = tiny_gptj_source(cfg, tmp_path)
  cfg.model.init_from = str(source)
  workdir = str(tmp_path / "run")
  records = rounds.run(cfg, workdir)
  assert [r["round"] for r in records] == [0, 1, 2] and records[0]["test_accuracy"] is not None
  records = records[1:]  # round 0: the pretrained student as it is (eval.initial's default)
  state = json.loads(read(workdir, "state.json"))

  assert "exam_0" in state["completed"]
  exam_0 = json.loads(read(workdir, "round_0", "exam.json"))
  train_1 = json.loads(read(workdir, "round_1", "train.json"))
  train_2 = json.loads(read(workdir, "round_2", "train.json"))
  assert exam_0["mistakes"] > 0 and train_1["negatives"] == exam_0["mistakes"]
  assert train_1["self_reflection"] and records[0]["mistakes"] == exam_0["mistakes"]
  assert train_1["optimizer_step_at_start"] == 0
  assert train_2["optimizer_step_at_start"] == train_1["steps"]
  for train in (train_1, train_2):
    assert 0 <= train["padding_share"] < 0.5 and 1 <= train["lm_lengths"] <= train["steps"]
    assert train["lm_lengths"] <= train["step_shapes"] <= train["steps"]
  student = load_student(os.path.join(workdir, "checkpoints", "round_1"))
  assert student.model.cfg.vocab_size == tok.vocab_size + 1  # the added <|pad|> row
  assert student.tokenizer.pad_id == tok.vocab_size
  assert student.tokenizer.backend.id_to_token(tok.vocab_size) == "<|pad|>"
  assert sorted(k for k in student.params if k.startswith("layer_")) == ["layer_0", "layer_1"]


def test_pad_row_is_the_mean_of_the_old_rows():
  import numpy as np
  from tailored_jax.student_io import vocab

  embedding = np.arange(12, dtype=np.float32).reshape(4, 3)
  grown = vocab.with_mean_row(embedding, 0, pad_id=4, old_vocab=4)
  assert grown.shape == (5, 3) and grown[4].tolist() == [4.5, 5.5, 6.5]
  head = embedding.T  # [embed, vocab]
  inside = vocab.with_mean_row(head, 1, pad_id=3, old_vocab=3)  # GPT-J: spare rows exist
  assert inside.shape == (3, 4) and inside[:, 3].tolist() == [3.0, 4.0, 5.0]
  assert (inside[:, :3] == head[:, :3]).all()


def test_two_runs_of_one_config_are_identical(reference, tmp_path):
  """Same config, same machine: every summary field but `seconds`, and every data file."""
  workdir, records = reference
  again = rounds.run(tiny_config(), str(tmp_path))
  strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
  assert strip(again) == strip(records)
  for parts in (
      ("round_1", "teacher_data.jsonl"),
      ("round_1", "mistakes.jsonl"),
      ("round_2", "teacher_data.jsonl"),
      ("round_2", "eval_test.jsonl"),
  ):
    assert read(str(tmp_path), *parts) == read(workdir, *parts), parts


def test_the_stop_rule_ends_the_run_early_and_says_why(reference, tmp_path):
  """Too few mistakes left after round 1's exam: no feedback is paid, round 2 never trains."""
  cfg = tiny_config()
  cfg.method.stop_min_mistakes = 1000
  records = rounds.run(cfg, str(tmp_path))
  assert [r["round"] for r in records] == [1]
  exam = json.loads(read(str(tmp_path), "round_1", "exam.json"))
  assert records[0]["stop_reason"] == (
      f"the exam after round 1 found {exam['mistakes']} mistakes, fewer than "
      "method.stop_min_mistakes=1000"
  )
  assert cache_lines(str(tmp_path)) == 16  # annotation only
  assert {k: v for k, v in records[0].items() if k not in ("seconds", "stop_reason")} == {
      k: v for k, v in reference[1][0].items() if k not in ("seconds", "stop_reason")
  }
  assert rounds.run(cfg, str(tmp_path)) == records  # a re-run stops at the same place


def _without_seconds(records):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_a_replayed_teacher_reruns_a_recorded_run_offline(reference, tmp_path):
  """teacher.kind=replay answers from another run's teacher_cache.jsonl alone: the same results
  with nothing sent, the recording untouched; a request it lacks fails naming the recording."""
  from tailored_jax.teacher.client import TeacherError

  recording = os.path.join(reference[0], "teacher_cache.jsonl")
  before = read(reference[0], "teacher_cache.jsonl")
  cfg = tiny_config()
  cfg.teacher.update(kind="replay", replay_from=recording)
  assert _without_seconds(rounds.run(cfg, str(tmp_path / "replayed"))) == _without_seconds(
      reference[1]
  )
  assert not os.path.exists(tmp_path / "replayed" / "teacher_cache.jsonl")
  cfg.teacher.num_rationales = 3  # requests the recorded run never made
  with pytest.raises(TeacherError, match=r"replay: .*teacher_cache.jsonl has no reply for request"):
    rounds.run(cfg, str(tmp_path / "missing"))
  assert read(reference[0], "teacher_cache.jsonl") == before


GSM8K = os.path.join(DATA, "gsm8k")


@pytest.mark.skipif(not os.path.isdir(GSM8K), reason=f"GSM8K files not found at {GSM8K}")
def test_a_gsm8k_slice_runs_end_to_end_with_the_human_rationale_teacher(tmp_path):
  """teacher.kind=dataset: a fixed slice of the real GSM8K file, no API; the training data is
  the dataset's own solutions, cleaned of calculator notes."""
  cfg = tiny_config()
  cfg.rounds = 1
  cfg.task.update(
      name="gsm8k", data_path=GSM8K, num_val=4, max_train=8, max_test=4, max_new_tokens=8
  )
  cfg.teacher.update(kind="dataset", num_rationales=1)  # one human solution per question
  cfg.method.self_reflection = False  # which needs a second rationale as its positive
  cfg.exam.max_new_tokens = 8
  workdir = str(tmp_path / "gsm8k")
  records = rounds.run(cfg, workdir)
  assert records[0]["teacher_requests"] == 8 and records[0]["train_examples"] == 8
  train = [json.loads(line) for line in read(workdir, "data", "train.jsonl").splitlines()]
  data = [json.loads(line) for line in read(workdir, "round_1", "teacher_data.jsonl").splitlines()]
  assert [d["qid"] for d in data] == [t["id"] for t in train]
  assert all("<<" not in d["continuation"] and "####" not in d["continuation"] for d in data)
  assert "Natalia sold 48/2 = 24 clips in May." in data[0]["continuation"]


def test_cut_or_withheld_teacher_replies_are_rejected_with_their_reason(tmp_path):
  run = rounds.Run(tiny_config(), str(tmp_path / "run"))
  example = run.splits["train"][0]
  good = f"Reasoning: {example.rationale}\nAnswer: {example.gold}"
  counts = {}
  kept = run._keep_correct(
      example,
      [good, good[:20], "", good],
      "annotation",
      1,
      set(),
      counts,
      finish_reasons=["length", "length", "content_filter", "stop"],
  )
  assert counts == {"truncated": 2, "content_filter": 1} and len(kept) == 1


def test_round_0_evaluates_the_initial_student_and_changes_nothing_after(reference, tmp_path):
  """`eval.initial`: the untrained student's few-shot accuracy recorded as round 0 (summary,
  report, never the best round); the trained rounds' records are the reference run's."""
  from tailored_jax import report, summary

  cfg = tiny_config()
  cfg.eval.initial = True
  workdir = str(tmp_path / "run")
  records = rounds.run(cfg, workdir)
  assert [r["round"] for r in records] == [0, 1, 2]
  initial = records[0]
  assert initial["train_examples"] == 0 and initial["teacher_requests"] == 0
  evaluated = [json.loads(x) for x in read(workdir, "round_0", "eval_test.jsonl").splitlines()]
  assert initial["test_accuracy"] == sum(r["correct"] for r in evaluated) / len(evaluated)
  strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
  assert strip(records[1:]) == strip(reference[1])
  assert summary.best_round(records)["round"] > 0
  report.main(["--workdir", workdir])
  assert "| 0 | " in read(workdir, "report.md")


def test_answer_only_baseline_trains_on_gold_answers_without_a_teacher(tmp_path, paid):
  """task.format=answer_only: D_1 is every train question with its gold answer, nothing is
  asked of the teacher, and the evaluation prompt asks for the answer alone."""
  cfg = tiny_config()
  cfg.task.format = "answer_only"
  cfg.method.feedback = cfg.method.self_reflection = False
  workdir = str(tmp_path / "run")
  records = rounds.run(cfg, workdir)
  assert paid["n"] == 0 and [r["teacher_requests"] for r in records] == [0, 0]
  data = [json.loads(x) for x in read(workdir, "round_1", "teacher_data.jsonl").splitlines()]
  train = [json.loads(x) for x in read(workdir, "data", "train.jsonl").splitlines()]
  assert [(d["qid"], d["continuation"]) for d in data] == [
      (q["id"], f" {q['gold']}") for q in train
  ]
  assert records[-1]["optimizer_steps"] > 0
  cfg.method.self_reflection = True
  with pytest.raises(config_lib.ConfigError, match="task.format"):
    config_lib.validate(cfg)


def test_a_batch_mode_run_equals_the_sync_run(reference, tmp_path):
  """teacher.mode=batch against the local server's batch API: annotation and feedback paid as
  batches (at half price), records and teacher data the reference (sync) run's."""
  cfg = tiny_config()
  cfg.teacher.update(mode="batch", batch_poll_s=0.0)
  workdir = str(tmp_path / "run")
  records = rounds.run(cfg, workdir)
  strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
  assert strip(records) == strip(reference[1])
  for name in ("round_1/teacher_data.jsonl", "round_2/teacher_data.jsonl"):
    assert read(workdir, name) == read(reference[0], name)
  for r in (1, 2):
    usage = json.loads(read(workdir, f"round_{r}", "teacher.json"))["usage"]
    assert usage["batch_requests"] == usage["requests"] > 0
  manifest = json.loads(read(workdir, "teacher_batches.json"))
  assert [b["label"] for b in manifest["batches"]] == ["annotate", "feedback 1"]
  assert all(b["state"] == "done" for b in manifest["batches"])


def test_star_learns_from_its_own_right_answers_and_rationalizes_the_rest(tmp_path, monkeypatch):
  """teacher.kind=self: exam 0 runs before annotation; a question with a right sample keeps its
  distinct right rationales; one without is asked again with the gold answer as a hint, and a
  right answer to that is kept as if no hint had been given. Nothing is asked of a teacher."""
  import types

  cfg = tiny_config()
  cfg.teacher.kind = "self"
  cfg.method.self_reflection = False
  run = rounds.Run(cfg, str(tmp_path / "run"))
  run._phase("prepare", run.prepare)
  run.student = types.SimpleNamespace(
      decoder=None, tokenizer=None, decode_layout="train", decode_params=lambda r: None
  )
  train = run.splits["train"][:3]
  answer = lambda x, gold=None: run.task.format_continuation(
      x.question, x.rationale, gold or x.gold
  )
  wrong = lambda x: answer(x, str(int(x.gold) + 1))
  outputs = [[answer(train[0]), wrong(train[0]), answer(train[0])], [wrong(train[1])] * 3]
  outputs.append([wrong(train[2])] * 3)
  asked = []

  def rationalize(decoder, params, tokenizer, prompts, **kw):
    asked.extend(prompts)
    assert kw["label"] == "rationalization 0" and kw["num_samples"] == 1
    hinted = f"(Hint: the answer is {train[1].gold}.)"
    echoed = run.task.format_continuation(
        train[1].question, f"{hinted}\n{train[1].rationale}", train[1].gold
    )
    return [[echoed], [wrong(train[2])]]

  monkeypatch.setattr(rounds, "generate_texts", rationalize)
  run._own_rationales(0, train, outputs)
  assert len(asked) == 2
  assert f"{train[1].question.rstrip()} (Hint: the answer is {train[1].gold}.)" in asked[0]
  run._own_data(0, "annotate")
  data = [json.loads(x) for x in read(run.workdir, "round_1", "teacher_data.jsonl").splitlines()]
  assert [(d["qid"], d["source"]) for d in data] == [
      (train[0].id, "self"),
      (train[1].id, "rationalization"),
  ]
  assert [d["continuation"] for d in data] == [answer(train[0]), answer(train[1])]  # no hint


def test_a_star_run_goes_end_to_end_without_a_teacher(tmp_path, monkeypatch, paid):
  """The STaR baseline as a config of the loop: exam 0 (here answered right for every other
  question, as a pretrained student might) feeds round 1; round 1's own exam and
  rationalization feed round 2; no teacher request."""
  cfg = tiny_config()
  cfg.teacher.kind = "self"
  cfg.method.self_reflection = False
  workdir = str(tmp_path / "run")
  real = rounds.generate_texts
  by_prompt = {}

  def first_exam_half_right(decoder, params, tokenizer, prompts, **kw):
    if kw["label"] != "exam 0":
      return real(decoder, params, tokenizer, prompts, **kw)
    out = []
    for i, prompt in enumerate(prompts):
      x = by_prompt[prompt]
      gold = x.gold if i % 2 == 0 else str(int(x.gold) + 1)
      out.append([run_task.format_continuation(x.question, x.rationale, gold)] * kw["num_samples"])
    return out

  monkeypatch.setattr(rounds, "generate_texts", first_exam_half_right)
  run = rounds.Run(cfg, workdir)
  run_task = run.task
  by_prompt.update({run.task.format_prefix(x.question, run.demos): x for x in run.splits["train"]})
  records = run.run()
  assert paid["n"] == 0 and [r["round"] for r in records] == [1, 2]
  state = json.loads(read(workdir, "state.json"))["completed"]
  assert state.index("exam_0") < state.index("annotate") < state.index("train_1")
  data = [json.loads(x) for x in read(workdir, "round_1", "teacher_data.jsonl").splitlines()]
  assert sum(d["source"] == "self" for d in data) == 8  # the 8 of 16 answered right
  assert records[0]["train_examples"] == len(data) and records[1]["optimizer_steps"] > 0
  assert os.path.exists(os.path.join(workdir, "round_1", "own_rationales.jsonl"))
