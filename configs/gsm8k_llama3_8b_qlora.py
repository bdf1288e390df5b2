"""GSM8K with LLaMA 3 8B as a QLoRA student: the frozen base stored as NF4 codes (0.56 bytes a
weight), rank-16 adapters on every projection; one 24 GB GPU (`mesh.preset=l4-1x1`).

python -m tailored_jax.main --config=configs/gsm8k_llama3_8b_qlora.py --workdir=DIR \\
    --config.model.init_from=PATH --config.task.data_path=FOLDER
PATH: an HF Meta-Llama-3-8B directory; FOLDER: the task's original files; the teacher key in $OPENAI_API_KEY.
"""

import os

from tailored_jax import config_lib


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.from_file(os.path.join(here, "gsm8k_llama3_8b_lora.py"))
  c.model.base_quantization = "nf4"
  return c
