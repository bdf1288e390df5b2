"""The config schema (every field, with its default and meaning) and its validation.

Experiment files in `configs/` start from `base_config()` and override fields; `validate`
checks values and cross-field constraints and names the offending field.
"""

from __future__ import annotations

import ast
import json
import os

import ml_collections
from ml_collections import config_dict

# Common slices: devices, memory per device (GB, vendor figures) and the (data, fsdp, tensor)
# mesh the paper's students use there: weights and AdamW state sharded over the fast
# interconnect (fsdp), data parallel across hosts where a slice spans them.
MESH_PRESETS = {
    "tpu-v4-8": (4, 32, (1, 4, 1)),
    "tpu-v4-32": (16, 32, (1, 16, 1)),
    "tpu-v5e-16": (16, 16, (1, 16, 1)),
    "tpu-v5p-8": (4, 95, (1, 4, 1)),
    "h100-1x1": (1, 80, (1, 1, 1)),
    "l4-1x1": (1, 24, (1, 1, 1)),
    "h100-1x8": (8, 80, (1, 8, 1)),
    "h100-2x8": (16, 80, (2, 8, 1)),
}


def mesh_preset(name: str) -> tuple[int, float, tuple[int, int, int]]:
  """(devices, memory GB per device, (data, fsdp, tensor)) of a `MESH_PRESETS` slice or of a
  TPU topology as libtpu names it ('v5e:4x4': 16 chips, FSDP over all of them)."""
  from tailored_jax import tpu_slices  # a leaf too; loaded only for TPU names

  if name in MESH_PRESETS:
    return MESH_PRESETS[name]
  tpu = tpu_slices.parse(name)  # TopologyError naming the accepted forms
  return tpu.chips, tpu.chip.hbm_bytes / 1e9, (1, tpu.chips, 1)


def _is_topology(name: str) -> bool:
  from tailored_jax import tpu_slices

  return tpu_slices.is_topology(name)


# Named here (this module imports no jax) and used by the models and `sharding.py`.
REMAT_POLICIES = ("none", "full", "minimal", "save_attention")
# The projections LoRA can adapt (model.lora_targets), named as LLaMA's; GPT-J's fc_in and fc_out
# are up and down.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# The training attention (model.attention); `models/attention/dispatch.py` resolves 'auto'.
ATTENTION = ("auto", "xla", "cudnn", "splash", "cpu_native", "cpu_blockwise")
DECODE_LAYOUTS = ("model_parallel", "replicated", "train")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42  # seeds data order, sampling and init
  c.rounds = 3  # R: training rounds (round 1 learns from teacher rationales)

  c.method = ml_collections.ConfigDict()
  c.method.feedback = True  # ask the teacher for tailored rationales on exam mistakes
  c.method.self_reflection = True  # add the triplet loss against the student's own mistakes
  # Exam the initial student for round-1 negatives (N_0, METHOD §2). Unset: on exactly when
  # model.init_from names a pretrained student; a student trained from scratch (quickstart) has
  # no reasoning to learn from, so it is off there.
  c.method.initial_exam = config_dict.placeholder(bool)
  c.method.accumulate_data = True  # train round r on D_1 ∪ … ∪ D_r (else D_r alone)
  # The stop rule (`rounds` is then a maximum): stop once validation accuracy has not improved
  # for this many rounds (0: never), or once an exam finds fewer distinct mistakes than
  # stop_min_mistakes (0: never). The reason is in summary.json (`stop_reason`) and stop.json.
  c.method.stop_patience = 0
  c.method.stop_min_mistakes = 0
  # New optimizer state and warm-up every round (METHOD §2); False carries the AdamW moments and
  # the schedule's step from round r-1 into round r (saved beside each round's params).
  c.method.fresh_optimizer = True
  # How the student learns from its own wrong rationales: 'triplet' (METHOD §3: hidden-state
  # triplet loss) or 'dpo' (DPO on (correct, own wrong) pairs, reference: the round's start).
  c.method.reflection_loss = "triplet"

  c.task = ml_collections.ConfigDict()
  c.task.name = "synthetic_arith"  # or gsm8k, multiarith, svamp, csqa, strategyqa
  c.task.source = "files"  # 'files' (original files) or 'tfds:NAME' (prepared TFDS)
  c.task.data_path = ""  # folder with the original files, or the TFDS data_dir
  c.task.num_val = 100  # validation slice held out of train (real tasks)
  c.task.split_seed = 0  # seeds the 70/30 split and the validation slice
  c.task.skip_malformed = False  # skip (and count) malformed records instead of failing
  c.task.num_demos = 0  # few-shot demos in every prompt; -1: all the task has
  c.task.max_train = 0  # > 0: only the first N train questions (a fixed slice); 0: all
  c.task.max_test = 0  # > 0: only the first N test questions; 0: all
  c.task.max_new_tokens = 0  # greedy evaluation budget; 0: the task's default
  # 'rationale' (the method: question -> rationale -> answer) or 'answer_only' (the baseline
  # the paper compares with: fine-tuning on question -> gold answer, no teacher and no
  # rationale; needs method.feedback and method.self_reflection off)
  c.task.format = "rationale"
  # Math answers compared as numbers (`18.00` equals `18`). Off: METHOD §5's rule, the string
  # after removing commas (and a sentence's full stop) must equal the gold string.
  c.task.numeric_equality = False
  c.task.synthetic = ml_collections.ConfigDict()
  c.task.synthetic.seed = 0
  c.task.synthetic.num_train = 1000
  c.task.synthetic.num_val = 200  # held out of training, for model selection
  c.task.synthetic.num_test = 500
  c.task.synthetic.min_steps = 1
  c.task.synthetic.max_steps = 3
  c.task.synthetic.max_start = 20
  c.task.synthetic.max_operand = 10
  c.task.synthetic.operations = "add,sub,mul"

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""  # a tokenizer.json; empty: train a byte-level BPE on the task
  c.tokenizer.vocab_size = 600  # for the trained BPE

  c.model = ml_collections.ConfigDict()
  c.model.family = "llama"
  c.model.init_from = ""  # an HF directory or a .gguf file; sizes below are then ignored
  c.model.add_pad_token = True  # pretrained tokenizer without a pad: add one, mean-initialised
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 32
  c.model.d_ff = 384
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-5
  c.model.tie_embeddings = True
  c.model.dtype = "float32"  # compute dtype; bfloat16 on GPU/TPU
  c.model.param_dtype = "float32"
  # What each block keeps for the backward pass: 'none' (everything), 'full' (only its input;
  # recomputed), 'minimal' (the weight matmuls' outputs), 'save_attention' (the attention's
  # output and what its backward reads: the attention runs once; on CPU the fastest at 8 x 512).
  c.model.remat = "none"
  c.model.scan_layers = False  # one nn.scan over stacked layers: one layer compiled at any depth
  # The training attention, chosen once for the devices the step compiles for and logged:
  # 'auto' picks per platform (CPU: 'cpu_native' where it builds and the compute dtype is
  # float32, else 'cpu_blockwise'; GPU: 'cudnn' where it takes the dtype and head size, else
  # 'xla'; TPU: 'splash'). 'cpu_native' a flash kernel compiled on first use with the machine's
  # C++ compiler (about twice the blockwise form's speed), 'cpu_blockwise' the blockwise form in
  # XLA ops, 'xla' one jax.nn.dot_product_attention in XLA ops (scores materialised), 'cudnn'
  # cuDNN's flash kernel (GPU, bf16/fp16), 'splash' JAX's Pallas splash kernel (TPU).
  c.model.attention = "auto"
  # The decode KV cache's dtype ('' = the compute dtype): 'bfloat16' halves a float32 model's
  # cache (keys and values rounded once when written; attention still computes in model.dtype);
  # 'int8' keeps each token's key and value vectors per kv head as int8 with one float32 scale
  # (absolute maximum / 127): a quarter of float32's bytes plus 4 / head_dim.
  c.model.kv_cache_dtype = ""
  # LoRA (Hu et al., 2021): 0 trains every weight; r > 0 freezes them and trains rank-r adapters
  # beside the targeted projections (q, k, v, o, gate, up, down; GPT-J's fc_in/fc_out are
  # up/down), scaled by lora_alpha / r. Decoding and export fold the adapters in.
  c.model.lora_rank = 0
  c.model.lora_alpha = 16.0
  c.model.lora_targets = "q,k,v,o,gate,up,down"
  c.model.lora_dropout = 0.0  # dropout on each adapter's input in training (PEFT's lora_dropout)
  # QLoRA: the frozen projection weights stored as 'int8' or 'nf4' codes with absmax scales per
  # block of 64 inputs, dequantised in the compute dtype inside each layer ('none': param_dtype)
  c.model.base_quantization = "none"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.num_devices = 0  # use the first N devices; 0: all of them
  # A slice from MESH_PRESETS (e.g. 'h100-1x8') or a TPU topology as libtpu names it (e.g.
  # 'v5e:4x4': FSDP over its chips): its (data, fsdp, tensor) replace the three sizes above, and
  # the run checks it has that many devices.
  c.mesh.preset = ""
  # Weights while decoding (exam, evaluation): 'model_parallel' splits heads/mlp/vocab over
  # tensor and fsdp (no per-token weight all-gather), 'replicated' keeps a whole copy per device,
  # 'train' decodes in the training layout; 'auto' compiles one exam decode step in each at the
  # start and takes the fastest that fits by the compiler's numbers (`exam_plan`; logged).
  c.mesh.decode_layout = "model_parallel"

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global batch, distinct questions per batch
  c.train.epochs = 10  # per round
  c.train.lr = 7e-6
  c.train.warmup_steps = 100
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.weight_decay = 0.01
  # Global-norm clip; 0: off, as in the paper (METHOD §4) and so in every paper config. The
  # quickstart's from-scratch student at lr 1e-3 sets 1.0.
  c.train.grad_clip = 0.0
  c.train.max_seq_len = 1024  # longer training strings are cut (and counted)
  # > 0: each batch's LM arrays padded to its own longest string, rounded up to a multiple of
  # this (one compiled step per distinct length; train.json reports the padding share and the
  # step shapes); 0: every batch at the round's longest string.
  c.train.length_bucket = 0
  c.train.prefix_weight = 0.1  # LM loss weight on prefix (demos + question) tokens
  c.train.sr_weight = 0.5  # λ
  c.train.sr_margin = 1.0  # ρ
  # > 0: the LM loss makes the vocabulary logits this many positions at a time (recomputed in
  # the backward pass), for large vocabularies; 0: all positions at once.
  c.train.loss_chunk_tokens = 0
  c.train.max_continuation_len = 192
  c.train.max_positives = 10
  c.train.sr_batch_size = 0  # rows per step that get the triplet loss; 0: the whole batch
  # True: the triplet loss reuses the LM forward: its anchor is the LM row's hidden state at EOS
  # (gradient reaching the prefix too; not capped at max_continuation_len) and the positive and
  # negative continue from its prefix keys/values (stop-gradient). False: METHOD §3 as written
  # (a separate stop-gradient prefix pass and three continuations).
  c.train.sr_reuse_lm_forward = False
  c.train.max_negatives = 4
  # Gradient accumulation: each step's rows (LM and self-reflection) in this many slices, one
  # optimizer update from their summed gradients (the same update as the whole batch's). 0: the
  # fewest slices whose step fits the memory budget, chosen by the planner and logged.
  c.train.microbatches = 1
  c.train.dpo_beta = 0.1  # DPO's β (method.reflection_loss='dpo')
  # A step whose loss or gradient is not finite is skipped (weights and AdamW state unchanged);
  # this many in a row stop the run (checked at log points and checkpoints). 0: no guard.
  # The largest step's planned bytes per device must fit this before anything is allocated
  # (train/memory.py); 0: the device's memory (host RAM over its devices on CPU); -1: no check.
  c.train.memory_budget_gb = 0.0
  c.train.max_nonfinite_steps = 3
  c.train.checkpoint_every_steps = 200  # mid-round checkpoints, for resuming a killed round
  c.train.log_every_steps = 50

  c.exam = ml_collections.ConfigDict()
  c.exam.num_samples = 4  # k sampled rationales per train question
  c.exam.temperature = 1.0
  c.exam.top_k = 50
  c.exam.top_p = 1.0
  c.exam.max_new_tokens = 128
  c.exam.batch_size = 64  # prompts per generation batch (x num_samples rows), at most
  # Device memory a decode batch (exam and evaluation) may use; the batch shrinks to fit its KV
  # cache. 0: half the device's free memory (host RAM available on CPU).
  c.exam.memory_budget_gb = 0.0
  # Exam and evaluation decode with continuous batching: batch_size x num_samples slots, a row
  # that stops frees its slot for the next prompt's (the same texts as static batches, which
  # run until their longest row stops).
  c.exam.continuous_batching = True

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256  # prompts per greedy batch
  c.eval.splits = "val,test"
  # Round 0: the initial student evaluated with the task's few-shot prompt before any training
  # (the prompting baseline every table of the paper starts from). Unset: for pretrained
  # students (model.init_from) only; a student trained from scratch starts at chance.
  c.eval.initial = config_dict.placeholder(bool)

  c.teacher = ml_collections.ConfigDict()
  # 'local': the loopback oracle (synthetic task); 'openai': any OpenAI-compatible base_url;
  # 'anthropic': Anthropic's Messages API; 'dataset': the task's own human rationales (GSM8K,
  # synthetic), no API; 'replay': the replies recorded in teacher.replay_from (another run's
  # teacher_cache.jsonl), nothing sent; 'self': STaR, no teacher: each round's data are the
  # student's own right exam samples (round 1: the initial student's), and with
  # teacher.star_rationalize its right answers when told the gold answer as a hint;
  # 'open_model': an open instruct model (teacher.model_path: an HF directory or a GGUF file)
  # decoding the prompts on the run's own devices, in its chat template.
  c.teacher.kind = "local"
  c.teacher.replay_from = ""
  c.teacher.star_rationalize = True  # teacher.kind=self: rationalization for unsolved questions
  c.teacher.model_path = ""  # teacher.kind=open_model: the model's HF directory or GGUF file
  c.teacher.base_url = ""  # '': the provider's own (api.openai.com/v1, api.anthropic.com/v1)
  c.teacher.model = "gpt-4o-mini"  # ignored for 'local'
  c.teacher.api_key_env = ""  # '': OPENAI_API_KEY or ANTHROPIC_API_KEY by teacher.kind
  # 'sync': one call per request as it goes; 'batch': the provider's batch API first (OpenAI's
  # /v1/batches, Anthropic's /v1/messages/batches: half the price, within 24 h), whatever it
  # cannot answer then sync. Servers without batch endpoints (vLLM, llama.cpp) get sync calls.
  c.teacher.mode = "sync"
  c.teacher.batch_poll_s = 60.0  # between batch status polls
  c.teacher.batch_deadline_h = 24.0  # per phase, from its first batch; then the rest go sync
  c.teacher.batch_retries = 2  # times failed lines (errored, expired) are batched again
  c.teacher.batch_max_lines = 0  # lines per batch; 0: the provider's limit
  c.teacher.batch_discount = 0.5  # batch price / sync price (both providers: 0.5)
  # Or a file holding the key (mode 600), read by process 0 alone: what launch/tpu_pod.sh copies
  # to worker 0, so the key is on no command line, log or workdir.
  c.teacher.api_key_file = ""
  c.teacher.num_rationales = 4  # rationales asked per question at annotation
  c.teacher.feedback_samples = 1  # tailored rationales asked per mistake
  c.teacher.temperature = 0.7
  c.teacher.max_tokens = 512
  c.teacher.max_concurrency = 32
  c.teacher.max_retries = 6
  c.teacher.timeout_s = 120.0  # one attempt on the wire: total, and the wait for each read
  c.teacher.connect_timeout_s = 10.0  # one attempt's TCP/TLS connect
  c.teacher.backoff_s = 1.0
  c.teacher.requests_per_minute = 0.0  # 0: no pacing
  c.teacher.supports_n = True  # False: send n single-choice requests (Ollama)
  c.teacher.max_requests = 0  # budget of paid requests per run; 0: unlimited
  c.teacher.tokens_per_minute = 0.0  # 0: no token pacing (x-ratelimit-* headers still obeyed)
  c.teacher.max_total_tokens = 0  # budget of prompt + completion tokens per run; 0: unlimited
  c.teacher.max_cost = 0.0  # budget in USD per run (needs teacher.prices); 0: unlimited
  # USD per million prompt/completion tokens: 'gpt-4o-mini=0.15/0.6,gpt-4o=2.5/10'
  c.teacher.prices = ""
  c.teacher.max_mistakes_per_question = 4
  c.teacher.local_error_rate = 0.1  # local oracle: chance a rationale has an arithmetic slip
  c.teacher.local_reply_delay_s = 0.0  # local oracle: each reply's latency (benchmarks)
  # Each exam batch's mistakes go to the teacher while the next batch decodes (sync mode), so
  # feedback ends shortly after the exam; the same requests and results as one after the other.
  c.teacher.stream_feedback = True

  # Scalars (loss, its parts, tokens/s, MFU every train.log_every_steps; per round: accuracies,
  # mistakes, teacher requests/tokens/cost, phase seconds), written by process 0 alone.
  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = True  # event files in WORKDIR/tensorboard (tensorboardX)
  c.logging.wandb_project = ""  # set: also to Weights & Biases (pip install -e '.[wandb]')
  c.logging.wandb_entity = ""
  c.logging.wandb_mode = "online"  # 'offline': a local run directory, `wandb sync` later
  return c


def paper_config(task: str, family: str) -> ml_collections.ConfigDict:
  """The paper's setting (METHOD §4) for one of its tasks, sized for a GPU/TPU pod: bf16,
  parameters sharded over fsdp, remat, all the task's demos, ChatGPT-class teacher. The user
  supplies `--config.model.init_from` and `--config.task.data_path`."""
  c = base_config()
  c.task.name = task
  c.task.num_demos = -1
  c.model.family = family
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.scan_layers = True
  c.train.length_bucket = 64
  c.train.loss_chunk_tokens = 128  # 49k–151k-token vocabularies: no full [b, t, v] logits
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.teacher.kind = "openai"
  c.teacher.model = "gpt-3.5-turbo"
  c.teacher.max_tokens = 512
  c.exam.batch_size = 32
  c.eval.batch_size = 64
  c.train.max_seq_len = 1024
  return c


class ConfigError(ValueError):
  pass


def initial_eval(c: ml_collections.ConfigDict) -> bool:
  """Whether the run evaluates the initial student as round 0: the field, or its default."""
  if c.eval.initial is None:
    return bool(c.model.init_from)
  return bool(c.eval.initial)


def initial_exam(c: ml_collections.ConfigDict) -> bool:
  """Whether the run exams the initial student (N_0): the field, or its default by student."""
  if c.method.initial_exam is None:
    return bool(c.model.init_from)
  return bool(c.method.initial_exam)


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A workdir's config.json over today's defaults (fields added since keep their defaults)."""
  cfg = base_config()
  for key, value in flatten(saved).items():
    section, _, name = key.rpartition(".")
    target = cfg
    for part in section.split(".") if section else []:
      target = target[part]
    if key == "model.remat" and isinstance(value, bool):  # saved before remat policies
      value = "full" if value else "none"
    target[name] = value
  return cfg


def from_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, so experiment files can start from another one."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(f"config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"config field {field}: {message}")


def _recording_exists(path: str) -> bool:
  """A teacher cache to replay: a file, or the chunk objects of one kept on Cloud Storage."""
  from tailored_jax import storage  # config stays a leaf module until a recording is checked

  return bool(path) and (storage.exists(path) or storage.exists(f"{path}.chunks"))


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field."""
  _require(c.rounds >= 1, "rounds", f"must be >= 1, got {c.rounds}")
  _require(c.task.num_demos >= -1, "task.num_demos", "must be >= -1")
  _require(c.task.max_new_tokens >= 0, "task.max_new_tokens", "must be >= 0")
  _require(
      c.task.format in ("rationale", "answer_only"),
      "task.format",
      f"'rationale' or 'answer_only', got {c.task.format!r}",
  )
  _require(
      c.task.format != "answer_only" or not (c.method.feedback or c.method.self_reflection),
      "task.format",
      "answer_only trains on gold answers alone: set method.feedback=False and "
      "method.self_reflection=False",
  )
  _require(c.task.num_val >= 1, "task.num_val", "must be >= 1")
  _require(
      c.task.source == "files" or c.task.source.startswith("tfds:"),
      "task.source",
      f"'files' or 'tfds:NAME', got {c.task.source!r}",
  )
  s = c.task.synthetic
  _require(
      1 <= s.min_steps <= s.max_steps,
      "task.synthetic.min_steps",
      f"need 1 <= min_steps <= max_steps, got {s.min_steps}, {s.max_steps}",
  )
  for name in ("num_train", "num_val", "num_test", "max_start", "max_operand"):
    _require(s[name] >= 1, f"task.synthetic.{name}", f"must be >= 1, got {s[name]}")
  ops = {o.strip() for o in s.operations.split(",") if o.strip()}
  _require(
      bool(ops) and ops <= {"add", "sub", "mul"},
      "task.synthetic.operations",
      f"a comma list of add, sub, mul; got {s.operations!r}",
  )
  m = c.model
  _require(m.family in ("llama", "gptj"), "model.family", f"'llama' or 'gptj', got {m.family!r}")
  _require(
      m.family != "gptj" or bool(m.init_from),
      "model.init_from",
      "GPT-J students start from pretrained weights: set it to an HF directory",
  )
  for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
    _require(m[name] >= 1, f"model.{name}", f"must be >= 1, got {m[name]}")
  _require(
      m.remat in REMAT_POLICIES,
      "model.remat",
      f"must be one of {list(REMAT_POLICIES)}, got {m.remat!r}",
  )
  _require(
      m.attention in ATTENTION,
      "model.attention",
      f"must be one of {list(ATTENTION)}, got {m.attention!r}",
  )
  _require(
      m.n_heads % m.n_kv_heads == 0,
      "model.n_kv_heads",
      f"n_heads={m.n_heads} must be a multiple of n_kv_heads={m.n_kv_heads}",
  )
  _require(m.head_dim % 2 == 0, "model.head_dim", "must be even (rotary embedding)")
  _require(m.lora_rank >= 0, "model.lora_rank", f"must be >= 0 (0: no LoRA), got {m.lora_rank}")
  _require(m.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {m.lora_alpha}")
  _require(
      0 <= m.lora_dropout < 1, "model.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}"
  )
  _require(
      m.base_quantization in ("none", "int8", "nf4"),
      "model.base_quantization",
      f"none, int8 or nf4; got {m.base_quantization!r}",
  )
  _require(
      m.base_quantization == "none" or m.lora_rank > 0,
      "model.base_quantization",
      "a quantised base is frozen: it needs LoRA adapters to train (model.lora_rank > 0)",
  )
  targets = [t.strip() for t in str(m.lora_targets).split(",") if t.strip()]
  _require(
      bool(targets) and set(targets) <= set(LORA_TARGETS),
      "model.lora_targets",
      f"a comma list of {', '.join(LORA_TARGETS)}; got {m.lora_targets!r}",
  )
  for name in ("dtype", "param_dtype"):
    _require(
        m[name] in ("float32", "bfloat16", "float16"),
        f"model.{name}",
        f"float32, bfloat16 or float16; got {m[name]!r}",
    )
  _require(
      m.kv_cache_dtype in ("", "float32", "bfloat16", "float16", "int8"),
      "model.kv_cache_dtype",
      f"'' (the compute dtype), float32, bfloat16, float16 or int8; got {m.kv_cache_dtype!r}",
  )
  t = c.train
  _require(t.batch_size >= 1, "train.batch_size", "must be >= 1")
  _require(t.epochs >= 1, "train.epochs", "must be >= 1")
  _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
  _require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
  _require(0 <= t.prefix_weight <= 1, "train.prefix_weight", "must be in [0, 1]")
  _require(t.sr_weight >= 0, "train.sr_weight", "must be >= 0")
  _require(
      c.method.reflection_loss in ("triplet", "dpo"),
      "method.reflection_loss",
      f"'triplet' or 'dpo', got {c.method.reflection_loss!r}",
  )
  _require(t.dpo_beta > 0, "train.dpo_beta", "must be > 0")
  _require(
      not (t.sr_reuse_lm_forward and c.method.reflection_loss == "dpo"),
      "train.sr_reuse_lm_forward",
      "applies to the triplet loss only, not method.reflection_loss='dpo'",
  )
  _require(
      0 <= t.sr_batch_size <= t.batch_size,
      "train.sr_batch_size",
      f"must be in [0, train.batch_size={t.batch_size}], got {t.sr_batch_size}",
  )
  _require(t.microbatches >= 0, "train.microbatches", f"must be >= 0, got {t.microbatches}")
  sr_rows = t.sr_batch_size or t.batch_size
  _require(
      t.microbatches <= 1 or (t.batch_size % t.microbatches == 0 and sr_rows % t.microbatches == 0),
      "train.microbatches",
      f"must divide train.batch_size={t.batch_size} and the self-reflection rows ({sr_rows}),"
      f" got {t.microbatches}",
  )
  _require(
      t.microbatches == 1 or not t.sr_reuse_lm_forward or sr_rows == t.batch_size,
      "train.microbatches",
      "with train.sr_reuse_lm_forward, slicing needs every LM row to be a self-reflection row"
      " (train.sr_batch_size 0)",
  )
  _require(t.max_seq_len >= 8, "train.max_seq_len", "must be >= 8")
  _require(t.length_bucket >= 0, "train.length_bucket", "must be >= 0")
  _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
  _require(t.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "must be >= 0")
  _require(t.loss_chunk_tokens >= 0, "train.loss_chunk_tokens", "must be >= 0")
  _require(t.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1")
  e = c.exam
  _require(e.num_samples >= 1, "exam.num_samples", "must be >= 1")
  _require(e.temperature >= 0, "exam.temperature", "must be >= 0")
  _require(e.top_k >= 0, "exam.top_k", "must be >= 0")
  _require(0 < e.top_p <= 1, "exam.top_p", "must be in (0, 1]")
  _require(e.max_new_tokens >= 1, "exam.max_new_tokens", "must be >= 1")
  _require(e.memory_budget_gb >= 0, "exam.memory_budget_gb", "must be >= 0")
  _require(
      not c.mesh.preset or c.mesh.preset in MESH_PRESETS or _is_topology(c.mesh.preset),
      "mesh.preset",
      f"must be one of {sorted(MESH_PRESETS)} or a TPU topology (e.g. v5e:4x4), got"
      f" {c.mesh.preset!r}",
  )
  _require(
      c.mesh.decode_layout in DECODE_LAYOUTS + ("auto",),
      "mesh.decode_layout",
      f"must be 'model_parallel', 'replicated', 'train' or 'auto', got {c.mesh.decode_layout!r}",
  )
  _require(
      c.logging.wandb_mode in ("online", "offline", "disabled"),
      "logging.wandb_mode",
      f"must be 'online', 'offline' or 'disabled', got {c.logging.wandb_mode!r}",
  )
  splits = {x.strip() for x in c.eval.splits.split(",") if x.strip()}
  _require(c.method.stop_patience >= 0, "method.stop_patience", "must be >= 0")
  _require(c.method.stop_min_mistakes >= 0, "method.stop_min_mistakes", "must be >= 0")
  _require(
      not c.method.stop_patience or "val" in splits,
      "method.stop_patience",
      "needs the val split in eval.splits",
  )
  _require(
      splits <= {"val", "test"} and bool(splits),
      "eval.splits",
      f"a comma list of val, test; got {c.eval.splits!r}",
  )
  tc = c.teacher
  _require(
      c.task.max_train >= 0 and c.task.max_test >= 0,
      "task.max_train",
      "task.max_train and task.max_test must be >= 0",
  )
  _require(
      tc.kind in ("local", "openai", "anthropic", "dataset", "replay", "self", "open_model"),
      "teacher.kind",
      "'local', 'openai', 'anthropic', 'dataset', 'replay', 'self' or 'open_model', got "
      f"{tc.kind!r}",
  )
  _require(
      tc.kind != "open_model" or _local_model_exists(tc.model_path),
      "teacher.model_path",
      f"teacher.kind=open_model needs an HF directory or a .gguf file, got {tc.model_path!r}",
  )
  _require(
      tc.kind != "self" or c.task.format == "rationale",
      "teacher.kind",
      "'self' (STaR) learns from the student's own rationales: it needs task.format=rationale",
  )
  _require(tc.mode in ("sync", "batch"), "teacher.mode", f"'sync' or 'batch', got {tc.mode!r}")
  _require(
      tc.kind != "anthropic" or 0 <= tc.temperature <= 1,
      "teacher.temperature",
      f"Anthropic's range is 0 to 1, got {tc.temperature}",
  )
  _require(
      tc.batch_poll_s >= 0 and tc.batch_deadline_h > 0,
      "teacher.batch_deadline_h",
      "teacher.batch_poll_s must be >= 0 and teacher.batch_deadline_h > 0",
  )
  _require(
      tc.batch_retries >= 0 and tc.batch_max_lines >= 0,
      "teacher.batch_retries",
      "teacher.batch_retries and teacher.batch_max_lines must be >= 0",
  )
  _require(0 < tc.batch_discount <= 1, "teacher.batch_discount", "must be in (0, 1]")
  try:
    prices = parse_prices(tc.prices)
  except ValueError as e:
    raise ConfigError(f"config field {e}") from None
  _require(
      not tc.max_cost or tc.model in prices,
      "teacher.max_cost",
      f"needs the price of {tc.model!r} in teacher.prices (USD per million tokens)",
  )
  _require(
      tc.tokens_per_minute >= 0 and tc.max_total_tokens >= 0 and tc.max_cost >= 0,
      "teacher.tokens_per_minute",
      "teacher pacing and budgets must be >= 0",
  )
  _require(
      tc.kind != "replay" or _recording_exists(tc.replay_from),
      "teacher.replay_from",
      f"teacher.kind=replay needs a recorded teacher_cache.jsonl, got {tc.replay_from!r}",
  )
  _require(tc.num_rationales >= 1, "teacher.num_rationales", "must be >= 1")
  _require(tc.feedback_samples >= 1, "teacher.feedback_samples", "must be >= 1")
  _require(tc.max_concurrency >= 1, "teacher.max_concurrency", "must be >= 1")
  _require(0 <= tc.local_error_rate < 1, "teacher.local_error_rate", "must be in [0, 1)")
  _require(tc.local_reply_delay_s >= 0, "teacher.local_reply_delay_s", "must be >= 0")
  if c.method.self_reflection:
    _require(
        tc.num_rationales >= 2,
        "teacher.num_rationales",
        "self-reflection needs >= 2 rationales per question (a positive besides the anchor)",
    )


# Fields that may change between a run and its resumption (they do not change results).
RESUMABLE_FIELDS = (
    "rounds",
    "teacher.base_url",
    "teacher.max_concurrency",
    "teacher.max_retries",
    "teacher.timeout_s",
    "teacher.connect_timeout_s",
    "teacher.backoff_s",
    "teacher.requests_per_minute",
    "teacher.max_requests",
    "train.log_every_steps",
    "teacher.tokens_per_minute",
    "teacher.max_total_tokens",
    "teacher.max_cost",
    "teacher.prices",
    "teacher.api_key_file",
    "teacher.api_key_env",
    "teacher.mode",  # the same requests either way
    "teacher.batch_poll_s",
    "teacher.batch_deadline_h",
    "teacher.batch_retries",
    "teacher.batch_max_lines",
    "teacher.batch_discount",
    "teacher.stream_feedback",
    "teacher.local_reply_delay_s",
    "eval.batch_size",
    "exam.batch_size",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "mesh.num_devices",
    "mesh.decode_layout",
    "model.attention",
    "train.microbatches",
    "model.cpu_attention",  # retired: workdirs written before model.attention replaced it
    "train.memory_budget_gb",
    "exam.memory_budget_gb",
    "exam.continuous_batching",  # the same texts either way
    "logging.tensorboard",
    "logging.wandb_project",
    "logging.wandb_entity",
    "logging.wandb_mode",
)


def flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def changed_fields(saved: dict, current: dict) -> list[str]:
  """Fields whose values differ between a saved run config and the current one, minus the
  fields that are safe to change on resume. A field added since the run was written counts at
  its default, which keeps the behaviour the run had (as in `from_saved`)."""
  b = flatten(current)
  a = flatten(json.loads(base_config().to_json())) | flatten(saved)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS)


def cost_usd(price: tuple[float, float], prompt_tokens: int, completion_tokens: int) -> float:
  """What tokens cost at `price` (USD per million prompt and completion tokens)."""
  return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


PROVIDER_DEFAULTS = {  # teacher.kind -> (base_url, api_key_env) where the config leaves them ''
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "anthropic": ("https://api.anthropic.com/v1", "ANTHROPIC_API_KEY"),
}


def teacher_endpoint(teacher: ml_collections.ConfigDict) -> tuple[str, str]:
  """(base_url, api_key_env) of an API teacher: the config's, else its provider's defaults."""
  base_url, key_env = PROVIDER_DEFAULTS.get(teacher.kind, PROVIDER_DEFAULTS["openai"])
  return teacher.base_url or base_url, teacher.api_key_env or key_env


def _local_model_exists(path: str) -> bool:
  return bool(path) and (
      os.path.isfile(os.path.join(path, "config.json"))
      or (path.endswith(".gguf") and os.path.isfile(path))
  )


def usage_cost_usd(price: tuple[float, float], usage: dict, batch_discount: float) -> float:
  """What a phase's `usage` (a teacher report's) cost: its batch tokens (`batch_prompt_tokens`,
  `batch_completion_tokens`, part of the totals) at `batch_discount` times the price."""
  batch_prompt = usage.get("batch_prompt_tokens", 0)
  batch_completion = usage.get("batch_completion_tokens", 0)
  return cost_usd(
      price,
      usage.get("prompt_tokens", 0) - batch_prompt,
      usage.get("completion_tokens", 0) - batch_completion,
  ) + batch_discount * cost_usd(price, batch_prompt, batch_completion)


def parse_prices(text: str) -> dict[str, tuple[float, float]]:
  """'MODEL=IN/OUT,…' (USD per million prompt / completion tokens) as {model: (in, out)}."""
  prices = {}
  for item in filter(None, (x.strip() for x in text.split(","))):
    model, _, pair = item.partition("=")
    prompt, _, completion = pair.partition("/")
    try:
      prices[model.strip()] = (float(prompt), float(completion))
    except ValueError:
      raise ValueError(f"teacher.prices: {item!r} is not MODEL=IN/OUT (USD per million tokens)")
  return prices


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """`--config.a.b=value` items applied as the command line of an ordinary run would: the value
  parsed as the field's type. Unknown fields and unparsable values raise ConfigError."""
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise ConfigError(f"override {item!r}: expected --config.FIELD=VALUE")
    key, _, raw = item[len("--config.") :].partition("=")
    *path, name = key.split(".")
    target = cfg
    try:
      for part in path:
        target = target[part]
      old = target[name]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"override {item!r}: no config field {key}") from None
    target[name] = _parse_like(old, raw, key)


def _parse_like(old, raw: str, key: str):
  try:
    if isinstance(old, bool):
      if raw.lower() not in ("true", "false", "1", "0"):
        raise ValueError(raw)
      return raw.lower() in ("true", "1")
    if isinstance(old, int):
      return int(raw)
    if isinstance(old, float):
      return float(raw)
    if isinstance(old, str):
      return raw
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise ConfigError(f"config field {key}: cannot read {raw!r} as {type(old).__name__}") from None
