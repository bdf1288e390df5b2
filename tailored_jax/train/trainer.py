"""The host side of training: the mesh, sharded init, the jitted step, one round's loop.

`train_step` is compiled once per batch shape with explicit state shardings and a donated
state; a round resumes from its newest mid-round checkpoint with the same batches it would
have seen (epoch order and self-reflection draws are seeded by round, epoch and step).
"""

from __future__ import annotations

import functools
import logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax import checkpointing, compile_options, preemption, sharding
from tailored_jax.data.batching import Batcher
from tailored_jax.models import for_devices, layers, lora
from tailored_jax.models.attention import dispatch
from tailored_jax.metrics import Metrics
from tailored_jax.progress import Progress
from tailored_jax.train import hooks as hooks_lib
from tailored_jax.train import memory as train_memory
from tailored_jax.train import step as step_lib
from tailored_jax.train import throughput


class NonFiniteError(RuntimeError):
  """Training diverged (or was fed NaN): nothing from the failing steps was applied or saved."""


def derive_seed(*parts: int) -> int:
  """One 32-bit seed from several integers (run seed, round, epoch, step, ...)."""
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class Trainer:

  def __init__(self, model, train_cfg, mesh, reflection_loss: str = "triplet"):
    model = for_devices(model, mesh.devices.flat)  # the attention for the step's devices
    self.model = model
    self.cfg = train_cfg
    self.reflection_loss = reflection_loss
    self.mesh = mesh
    self.optimizer = step_lib.make_optimizer(train_cfg)

    def init_boxed(key):
      params = layers.init_boxed_params(model, key)
      return params, self.optimizer.init(step_lib.trainable(params)[0])

    abstract_params, abstract_opt = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    self.param_shardings = sharding.logical_sharding(abstract_params, mesh)
    self.param_specs = nn.get_partition_spec(abstract_params)  # logical axis names
    self.opt_shardings = sharding.logical_sharding(abstract_opt, mesh)
    self.abstract_params = nn.meta.unbox(abstract_params)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params))
    self.abstract_opt = nn.meta.unbox(abstract_opt)
    replicated = sharding.replicated(mesh)
    self.state_shardings = step_lib.TrainState(
        replicated,
        self.param_shardings,
        self.opt_shardings,
        step_lib.Guard(replicated, replicated, replicated, replicated),
    )
    self._init_params = jax.jit(
        lambda key: nn.meta.unbox(init_boxed(key)[0]), out_shardings=self.param_shardings
    )
    self._init_opt = jax.jit(
        lambda params: self.optimizer.init(step_lib.trainable(params)[0]),
        out_shardings=self.opt_shardings,
    )
    self._init_adapters = jax.jit(
        lambda key: lora.split(nn.meta.unbox(init_boxed(key)[0]))[1],
        out_shardings=lora.split(self.param_shardings)[1],
    )
    self._all_finite = jax.jit(step_lib.all_finite)
    # train.microbatches 0: decided by `fit_memory` (the fewest slices that fit), else 1
    self.microbatches = max(train_cfg.get("microbatches", 1), 1)

  def init_params(self, seed: int):
    return self._init_params(jax.random.PRNGKey(seed))

  def with_fresh_adapters(self, params, seed: int):
    """Weights without LoRA adapters (pretrained ones) given this model's fresh adapters (B = 0:
    the same function); unchanged when the model has none."""
    if self.model.cfg.lora_rank == 0:
      return params
    return lora.join(params, self._init_adapters(jax.random.PRNGKey(seed)))

  def new_state(self, params) -> step_lib.TrainState:
    step = sharding.put_global(np.zeros((), np.int32), sharding.replicated(self.mesh))
    return step_lib.TrainState(step, params, self._init_opt(params), self._fresh_guard())

  def abstract_state(self) -> step_lib.TrainState:
    """The train state as shapes, dtypes and shardings (nothing allocated): for lowering the
    step ahead of time and reading XLA's memory analysis."""
    abstract = step_lib.TrainState(
        jax.ShapeDtypeStruct((), jnp.int32),
        self.abstract_params,
        self.abstract_opt,
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), step_lib.Guard.fresh()
        ),
    )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        self.state_shardings,
    )

  def _fresh_guard(self) -> step_lib.Guard:
    return jax.tree.map(
        lambda x: sharding.put_global(np.asarray(x), sharding.replicated(self.mesh)),
        step_lib.Guard.fresh(),
    )

  def check_finite_params(self, params, what: str) -> None:
    """Stops with NonFiniteError when any weight is NaN or infinite."""
    if not bool(self._all_finite(params)):
      raise NonFiniteError(
          f"{what}: the weights hold NaN or infinite values; they are not used "
          "(lower train.lr, or use float32 if bf16 overflowed)"
      )

  @functools.cached_property
  def planner(self) -> train_memory.Planner:
    """The memory planner for this trainer's worst-case step (nothing allocated)."""
    cfg = self.model.cfg
    state = train_memory.state_bytes(
        self.abstract_params,
        self.param_shardings,
        self.abstract_opt,
        self.opt_shardings,
        cfg.n_layers,
        self.mesh.shape["tensor"],
    )
    shape = train_memory.worst_case_shape(
        self.cfg, dict(self.mesh.shape), dispatch.uses_kernel(cfg), cfg.attention == "xla"
    )
    return train_memory.Planner(cfg, shape, state).with_microbatches(self.microbatches)

  def step_fn(self):
    """The jitted step `(state, lm, reflection | None[, reference params]) -> (state, metrics)`;
    it compiles once per batch shape, with and without reflection rows."""
    return self._step

  @functools.cached_property
  def _step(self):
    train_cfg, mesh = self.cfg, self.mesh
    step = functools.partial(
        step_lib.train_step,
        model=self.model,
        optimizer=self.optimizer,
        loss_cfg=step_lib.LossConfig(
            train_cfg.sr_weight,
            train_cfg.sr_margin,
            train_cfg.max_nonfinite_steps > 0,
            train_cfg.loss_chunk_tokens,
            self.reflection_loss,
            train_cfg.get("dpo_beta", 0.1),
            train_cfg.get("sr_reuse_lm_forward", False),
            self.microbatches,
        ),
    )

    def train_step(*args):  # traced under the activations' logical layout
      with sharding.activation_layout(mesh):
        return step(*args)

    return jax.jit(
        train_step,
        out_shardings=(self.state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compile_options.for_devices(mesh.devices),
    )

  def fit_memory(self, budget_gb: float, device_bytes) -> None:
    """Before anything is allocated: with train.microbatches 0 the fewest slices of the rows
    whose step fits (logged), then the planner's check (a ConfigError naming the numbers when
    the step cannot fit). `budget_gb` as `memory.Planner.check` reads it."""
    if self.cfg.get("microbatches", 1) == 0 and budget_gb >= 0:
      budget = int(budget_gb * train_memory.GB) if budget_gb else device_bytes()
      k = self.planner.fewest_microbatches(budget)
      if k:
        self.use_microbatches(k)
        logging.info(
            "train.microbatches=0: %d microbatches of %d rows fit %.2f GB per device",
            k,
            self.cfg.batch_size // k,
            budget / train_memory.GB,
        )
    self.planner.check(budget_gb, device_bytes)

  def use_microbatches(self, k: int) -> None:
    """Slices each step's rows `k` ways (before the step is first built)."""
    self.microbatches = k
    self.__dict__.pop("planner", None)
    self.__dict__.pop("_step", None)

  def _checked_guard(self, state: step_lib.TrainState, round_index: int, step_number: int):
    """The guard's record (one small device read); NonFiniteError once too many consecutive
    steps were skipped. Checked at log points, before each checkpoint and at the round's end."""
    guard = jax.device_get(state.guard)
    limit = self.cfg.max_nonfinite_steps
    if limit and int(guard.nonfinite_run) >= limit:
      first = int(guard.first_bad_step) + 1
      raise NonFiniteError(
          f"round {round_index}: {int(guard.nonfinite_run)} consecutive steps ({first} to "
          f"{step_number}) had a non-finite loss or gradient and were skipped; last finite loss "
          f"{float(guard.last_finite_loss):.4f}. Try a lower train.lr (now {self.cfg.lr:g}), "
          "float32 if bfloat16 overflowed, or look for a bad data row in those steps' batches. "
          "The round is not marked complete."
      )
    return guard

  def put_batch(self, batch):
    """A batch dataclass (or None) as global arrays, rows split over the batch axes."""
    return jax.tree.map(
        lambda v: sharding.put_global(v, sharding.batch_sharding(self.mesh, v.ndim)), batch
    )

  def schedule(self, batcher: Batcher, seed: int, round_index: int) -> list[list[int]]:
    """Every batch of the round, in order: `epochs` epochs of distinct-question batches."""
    batches = []
    for epoch in range(self.cfg.epochs):
      batches.extend(batcher.epoch(derive_seed(seed, round_index, epoch)))
    return batches

  def optimizer_carry(self, state: step_lib.TrainState) -> dict:
    """What `method.fresh_optimizer=False` carries into the next round: step and AdamW state."""
    return {"step": state.step, "opt_state": state.opt_state}

  def restore_carry(self, directory: str, params) -> step_lib.TrainState:
    like = {"step": jax.ShapeDtypeStruct((), jnp.int32), "opt_state": self.abstract_opt}
    shardings = {"step": sharding.replicated(self.mesh), "opt_state": self.opt_shardings}
    carry = checkpointing.restore_params(directory, like, shardings)
    return step_lib.TrainState(carry["step"], params, carry["opt_state"], self._fresh_guard())

  def train_round(
      self,
      params,
      batcher: Batcher,
      *,
      seed: int,
      round_index: int,
      checkpoint_dir: str,
      state=None,
      metrics: Metrics | None = None,
      step_offset: int = 0,
  ):
    """Trains one round from `params` (or from a given state, optimizer included); returns
    (final state, summary dict). `metrics` gets the train/* scalars at each log step, numbered
    `step_offset` + the round's step."""
    step_fn = self.step_fn()
    batches = self.schedule(batcher, seed, round_index)
    padding_share, lm_lengths = batcher.padding(batches)
    checkpoints = checkpointing.StepCheckpoints(checkpoint_dir, round_index)
    try:  # a save in flight commits (or fails) before anything leaves this round
      # DPO's reference model: the round's starting weights, copied before the state donates them
      reference = jax.tree.map(jnp.copy, params) if self.reflection_loss == "dpo" else None
      state = self.new_state(params) if state is None else state
      start_optimizer_step = int(jax.device_get(state.step))
      start, state = self._resume(checkpoints, state, round_index, len(batches))
      logging.info(
          "round %d: training on %d examples (%d with self-reflection pairs), %d steps, "
          "seq_len %d%s, %.1f%% padding, %d LM lengths",
          round_index,
          len(batcher),
          batcher.sr_candidates,
          len(batches),
          batcher.seq_len,
          f", {batcher.truncated} cut" if batcher.truncated else "",
          100 * padding_share,
          lm_lengths,
      )
      progress = Progress(f"train {round_index}", len(batches), "steps", start=start)
      completed = hooks_lib.CompletedSteps(progress)
      log = hooks_lib.TrainLog(
          self._checked_guard, self.flops, progress, metrics or Metrics(), step_offset
      )
      hooks = hooks_lib.Hooks()
      hooks.add(log.count, every=1, at_end=True)
      hooks.add(log, every=self.cfg.log_every_steps, at_end=True)
      hooks.add(
          functools.partial(self._checkpoint, checkpoints),
          every=self.cfg.checkpoint_every_steps,
          at_end=False,
      )
      round_start = time.time()
      step_shapes = set()  # (LM length, continuation length): one compiled step each
      total_tokens = 0
      for i in range(start, len(batches)):
        lm, reflection = batcher.build(batches[i], derive_seed(seed, round_index, i, 1))
        step_shapes.add(
            (lm.inputs.shape[1], None if reflection is None else reflection.continuations.shape[2])
        )
        inputs = int(lm.input_mask.sum()) + (
            0
            if reflection is None
            else int(reflection.prefix_mask.sum() + reflection.continuation_mask.sum())
        )
        state, step_metrics = step_fn(
            state, self.put_batch(lm), self.put_batch(reflection), reference
        )
        completed.dispatched(step_metrics["loss"])
        info = hooks_lib.StepInfo(
            round_index, i + 1, len(batches), state, step_metrics, int(lm.target_mask.sum()), inputs
        )
        total_tokens += info.target_tokens
        hooks(info)
        completed.poll()  # a log or checkpoint hook may have waited for the device
        if not info.last and preemption.reached(preemption.next_sync_step()):
          completed.drain()
          if not checkpoints.saved(info.step):
            self._checkpoint(checkpoints, info)
          progress.close()
          raise preemption.Preempted(
              f"round {round_index}: saved at step {info.step}/{len(batches)} in {checkpoint_dir}"
          )
      completed.drain()
      progress.close()
    finally:
      checkpoints.close()
    guard = self._checked_guard(state, round_index, len(batches))
    seconds = time.time() - round_start
    summary = {
        "steps": len(batches),
        "resumed_at_step": start,
        "seconds": seconds,
        "self_reflection": batcher.self_reflection,
        "optimizer_step_at_start": start_optimizer_step,
        "final_loss": log.last.get("loss"),
        "final_lm_loss": log.last.get("lm_loss"),
        "final_sr_loss": log.last.get("sr_loss"),
        "target_tokens": total_tokens,
        "padding_share": round(padding_share, 4),
        "lm_lengths": lm_lengths,
        "step_shapes": len(step_shapes),
        "nonfinite_steps_skipped": int(guard.nonfinite_total),
        "target_tokens_per_s": total_tokens / max(seconds, 1e-9),
    }
    return state, summary

  def _resume(self, checkpoints, state, round_index: int, steps: int):
    """(first step to run, state): from the newest intact step checkpoint, else the start."""
    had_checkpoints = bool(checkpoints.steps())
    found = checkpoints.restore_latest_intact(state, self.state_shardings)
    if found is not None:
      logging.info("round %d: resuming training at step %d/%d", round_index, found[0], steps)
      return found
    if had_checkpoints:
      logging.warning(
          "round %d: no intact step checkpoint left; training the round from its start",
          round_index,
      )
    return 0, state

  def _checkpoint(self, checkpoints, info: hooks_lib.StepInfo) -> None:
    self._checked_guard(info.state, info.round_index, info.step)
    checkpoints.save(info.step, info.state)

  def flops(self, input_tokens_per_s: float) -> throughput.ModelFlops:
    """Model FLOP/s per device of this trainer's mesh at a rate of tokens processed."""
    return throughput.model_flops(
        self.num_params, input_tokens_per_s, self.mesh.devices.flat, self.model.cfg.dtype
    )
