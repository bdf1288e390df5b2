"""GSM8K with GPT-J-6B (the paper's student), the paper's hyper-parameters, for a GPU/TPU pod.

python -m tailored_jax.main --config=configs/gsm8k_gptj6b.py --workdir=DIR \\
    --config.model.init_from=PATH --config.task.data_path=FOLDER
PATH: an HF GPT-J-6B directory; FOLDER: the task's original files; the teacher key in $OPENAI_API_KEY.
"""

from tailored_jax.config_lib import paper_config


def get_config():
  return paper_config("gsm8k", "gptj")
