"""GSM8K with LLaMA 3 8B as a LoRA student (rank 16 on every projection, bf16 frozen base): one
80 GB GPU (`mesh.preset=h100-1x1`) or a TPU host.

python -m tailored_jax.main --config=configs/gsm8k_llama3_8b_lora.py --workdir=DIR \\
    --config.model.init_from=PATH --config.task.data_path=FOLDER
PATH: an HF Meta-Llama-3-8B directory; FOLDER: the task's original files; the teacher key in $OPENAI_API_KEY.
"""

from tailored_jax.config_lib import paper_config


def get_config():
  c = paper_config("gsm8k", "llama")
  c.model.param_dtype = "bfloat16"  # the frozen base; adapters and their AdamW are float32
  c.model.lora_rank = 16
  c.model.lora_alpha = 32.0
  c.model.lora_targets = "q,k,v,o,gate,up,down"
  c.train.lr = 2e-4  # LoRA's usual rate (the paper's full fine-tune: 1e-5)
  return c
