"""Config files parse and validate; CLI overrides are applied or refused with a clear message."""

import glob
import json
import os
import subprocess
import sys

import pytest
from tailored_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_file_parses_and_validates(path):
  cfg = config_lib.from_file(path)
  if cfg.model.family == "gptj":  # pretrained-only: refused without weights, fine with them
    with pytest.raises(config_lib.ConfigError, match="model.init_from"):
      config_lib.validate(cfg)
    cfg.model.init_from = "/models/gpt-j-6b"
  config_lib.validate(cfg)


def test_paper_configs_carry_the_papers_hyper_parameters():
  cfg = config_lib.from_file(os.path.join(ROOT, "configs", "gsm8k_gptj6b.py"))
  t = cfg.train
  assert (t.batch_size, t.epochs, t.lr, t.warmup_steps, t.weight_decay) == (16, 10, 7e-6, 100, 0.01)
  assert (t.b1, t.b2, t.eps, t.prefix_weight, t.sr_weight, t.sr_margin) == (
      0.9,
      0.999,
      1e-8,
      0.1,
      0.5,
      1.0,
  )
  assert (cfg.exam.num_samples, cfg.exam.temperature, cfg.exam.top_k, cfg.exam.top_p) == (
      4,
      1.0,
      50,
      1.0,
  )
  assert cfg.rounds == 3 and cfg.seed == 42 and cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize(
    "name",
    [
        os.path.basename(p)[:-3]
        for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
        if not os.path.basename(p).startswith(("quickstart", "base"))
    ],
)
def test_paper_configs_do_not_clip_and_exam_the_pretrained_student(name):
  """METHOD §4: no gradient clipping; METHOD §2: N_0 from the initial (pretrained) student."""
  cfg = config_lib.from_file(os.path.join(ROOT, "configs", f"{name}.py"))
  assert cfg.train.grad_clip == 0.0
  cfg.model.init_from = "/models/student"
  assert config_lib.initial_exam(cfg)
  cfg.method.initial_exam = False  # an explicit choice wins
  assert not config_lib.initial_exam(cfg)


def test_students_from_scratch_skip_the_initial_exam():
  cfg = config_lib.from_file(os.path.join(ROOT, "configs", "quickstart.py"))
  assert cfg.method.initial_exam is None and not config_lib.initial_exam(cfg)
  assert cfg.train.grad_clip == 1.0 and config_lib.base_config().train.grad_clip == 0.0
  saved = config_lib.from_saved(json.loads(cfg.to_json()))
  assert saved.method.initial_exam is None
  on = cli("--config.method.initial_exam=True")
  assert on.returncode == 0, on.stderr
  assert json.loads(on.stdout)["method"]["initial_exam"] is True


def test_baseline_is_plain_distillation_with_a_larger_budget():
  load = lambda name: config_lib.from_file(os.path.join(ROOT, "configs", f"{name}.py"))
  tailored, baseline = load("quickstart"), load("quickstart_baseline")
  assert baseline.rounds == 1 and not baseline.method.feedback
  assert not baseline.method.self_reflection
  assert baseline.teacher.num_rationales > tailored.teacher.num_rationales
  assert baseline.model == tailored.model and baseline.task == tailored.task


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rounds", 0, "config field rounds: must be >= 1"),
        ("model.n_kv_heads", 3, "config field model.n_kv_heads"),
        ("exam.top_p", 0.0, "config field exam.top_p"),
        ("teacher.kind", "cohere", "config field teacher.kind"),
        ("model.kv_cache_dtype", "int4", "config field model.kv_cache_dtype"),
        ("task.synthetic.operations", "add,div", "config field task.synthetic.operations"),
    ],
)
def test_validate_names_the_field(field, value, message):
  cfg = config_lib.base_config()
  section, _, name = field.rpartition(".")
  (
      cfg
      if not section
      else cfg[section]
      if "." not in section
      else cfg[section.split(".")[0]][section.split(".")[1]]
  )[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg)


def cli(*args):
  return subprocess.run(
      [
          sys.executable,
          "-m",
          "tailored_jax.main",
          f"--config={ROOT}/configs/quickstart.py",
          "--dry_run",
          *args,
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=120,
  )


def test_cli_overrides_and_their_errors():
  good = cli("--config.rounds=2", "--config.train.lr=3e-4")
  assert good.returncode == 0, good.stderr
  printed = json.loads(good.stdout)
  assert printed["rounds"] == 2 and printed["train"]["lr"] == 3e-4
  unknown = cli("--config.train.lrr=3e-4")
  assert unknown.returncode != 0
  assert "lrr" in unknown.stderr and "Traceback" not in unknown.stderr
  mistyped = cli("--config.rounds=abc")
  assert mistyped.returncode != 0 and "--config.rounds=abc" in mistyped.stderr
  invalid = cli("--config.rounds=0")
  assert invalid.returncode != 0 and "config field rounds: must be >= 1" in invalid.stderr


def test_the_config_schema_is_a_leaf():
  """Importing the config loads no other module of the package (no teacher, model or jax)."""
  loaded = modules_after_import("tailored_jax.config_lib")
  assert sorted(m for m in loaded if m.startswith(("tailored_jax", "jax"))) == [
      "tailored_jax",
      "tailored_jax.config_lib",
  ]


def modules_after_import(module: str) -> set[str]:
  """The modules a fresh interpreter holds after importing `module`."""
  out = subprocess.run(
      [sys.executable, "-c", f"import sys, {module}; print(*sys.modules, sep=chr(10))"],
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  return set(out.split())


def test_overrides_parse_as_the_fields_type():
  cfg = config_lib.base_config()
  config_lib.apply_overrides(
      cfg,
      [
          "--config.train.lr=3e-4",
          "--config.rounds=2",
          "--config.method.feedback=false",
          "--config.teacher.model=m",
      ],
  )
  assert (cfg.train.lr, cfg.rounds, cfg.method.feedback, cfg.teacher.model) == (3e-4, 2, False, "m")
  with pytest.raises(config_lib.ConfigError, match="no config field train.nope"):
    config_lib.apply_overrides(cfg, ["--config.train.nope=1"])
  with pytest.raises(config_lib.ConfigError, match="config field rounds: cannot read 'two' as int"):
    config_lib.apply_overrides(cfg, ["--config.rounds=two"])


def test_execution_knobs_are_declared_once_and_reach_every_model():
  """dtype, param_dtype, remat, scan_layers, attention, LoRA: one `layers.Execution`, inherited
  by every family, filled from the config's model section by the run and the planner alike (the
  platform and device count are set when the attention is resolved for the step's devices)."""
  import dataclasses
  from tailored_jax import plan
  from tailored_jax.models import build_model
  from tailored_jax.models.gptj import GPTJConfig
  from tailored_jax.models.layers import Execution
  from tailored_jax.models.llama import LlamaConfig

  names = {f.name for f in dataclasses.fields(Execution)}
  assert names == {
      "dtype",
      "param_dtype",
      "remat",
      "scan_layers",
      "attention",
      "kv_cache_dtype",
      "platform",
      "devices",
      "lora_rank",
      "lora_alpha",
      "lora_targets",
      "lora_dropout",
      "base_quantization",
  }
  names -= {"platform", "devices"}
  for family in (LlamaConfig, GPTJConfig):
    assert issubclass(family, Execution)
  section = config_lib.base_config().model
  section.update(
      dtype="bfloat16",
      param_dtype="bfloat16",
      remat="full",
      scan_layers=True,
      attention="cpu_blockwise",
      kv_cache_dtype="float16",
      lora_rank=8,
      lora_alpha=4.0,
      lora_targets="q, v",
      lora_dropout=0.1,
      base_quantization="int8",
  )
  knobs = lambda cfg: {name: getattr(cfg, name) for name in names}
  wanted = {
      "dtype": "bfloat16",
      "param_dtype": "bfloat16",
      "remat": "full",
      "scan_layers": True,
      "attention": "cpu_blockwise",
      "kv_cache_dtype": "float16",
      "lora_rank": 8,
      "lora_alpha": 4.0,
      "lora_targets": ("q", "v"),
      "lora_dropout": 0.1,
      "base_quantization": "int8",
  }
  assert knobs(build_model(section, 300).cfg) == wanted
  assert knobs(plan.model_config("gptj_6b", section)) == wanted
  assert knobs(plan.model_config("llama3_8b", section)) == wanted


def test_the_models_package_is_the_network_alone():
  """Student I/O (HF, GGUF, tokenizers) lives in student_io: building a model loads none of it."""
  loaded = modules_after_import("tailored_jax.models")
  io = {"transformers", "gguf", "safetensors", "tailored_jax.student_io", "tailored_jax.teacher"}
  assert not io & loaded


def test_a_field_added_since_the_run_counts_at_its_default_on_resume():
  """A workdir written before a field existed resumes when the field keeps its default, and is
  refused when it is set to something else."""
  current = json.loads(config_lib.base_config().to_json())
  saved = json.loads(config_lib.base_config().to_json())
  del saved["model"]["kv_cache_dtype"]
  assert config_lib.changed_fields(saved, current) == []
  current["model"]["kv_cache_dtype"] = "int8"
  assert config_lib.changed_fields(saved, current) == ["model.kv_cache_dtype"]
  current["model"]["kv_cache_dtype"] = ""
  current["train"]["lr"] = 1.0
  assert config_lib.changed_fields(saved, current) == ["train.lr"]
