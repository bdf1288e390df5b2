"""The embedded default: the whole method, offline, on a laptop CPU in minutes.

A 3-layer student learns multi-step arithmetic from the loopback teacher over 3 rounds.
"""

from tailored_jax.config_lib import base_config


def get_config():
  c = base_config()
  c.rounds = 3
  c.task.synthetic.num_train = 500
  c.task.synthetic.max_steps = 2
  c.task.synthetic.num_val = 100
  c.task.synthetic.num_test = 300
  c.task.max_new_tokens = 96
  c.model.d_model = 128
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 32
  c.model.d_ff = 384
  c.train.batch_size = 32
  c.train.epochs = 3
  c.train.lr = 1e-3
  c.train.warmup_steps = 30
  c.train.grad_clip = 1.0  # a from-scratch student at lr 1e-3 (the paper clips nothing)
  c.train.sr_batch_size = 8  # triplet loss on 8 rows per step keeps rounds 2-3 fast on CPU
  c.train.log_every_steps = 25
  c.train.checkpoint_every_steps = 100
  c.exam.max_new_tokens = 96
  c.exam.num_samples = 2
  c.teacher.max_mistakes_per_question = 2
  c.exam.batch_size = 128
  c.eval.batch_size = 200
  return c
