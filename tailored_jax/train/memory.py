"""What the train step needs per device, by part, before anything is allocated: parameters,
gradients and AdamW state (exact, from their shardings), activations kept for the backward pass
(by remat policy), the loss's logits and the self-reflection rows; the largest batch that fits a
budget. Pure arithmetic over the configs; `plan.py` checks it against XLA's memory analysis."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
from jax.tree_util import tree_leaves as jax_leaves

from tailored_jax.config_lib import ConfigError
from tailored_jax.models.attention.blockwise import ATTENTION_BLOCK, query_blocks, row_tiles
from tailored_jax.models import lora
from tailored_jax.models.layers import LAYERS, is_stacked

GB = 1e9


@dataclasses.dataclass(frozen=True)
class StepShape:
  """The train step's work: global LM rows × tokens and self-reflection rows (0: none), split
  over `row_shards` devices (data × fsdp); heads and MLP split `tensor` ways."""

  batch: int
  seq_len: int
  sr_rows: int
  prefix_len: int
  continuation_len: int
  loss_chunk_tokens: int
  row_shards: int
  tensor: int
  fsdp: int = 1
  continuations: int = 3  # per self-reflection row: 2 when the anchor comes from the LM forward
  # A fused kernel (native CPU, splash, cuDNN): no score buffers in XLA's, one softmax part
  native_attention: bool = False
  full_scores: bool = False  # 'xla': one [rows, heads, queries, keys] scores buffer, not blocks
  microbatches: int = 1  # gradient accumulation: the rows run this many slices at a time


@dataclasses.dataclass(frozen=True)
class TrainMemory:
  """Bytes per device of one train step, by part."""

  parameters: int
  gradients: int
  optimizer: int
  activations: int  # kept across layers for the backward pass (the remat policy's choice)
  layer_working: int  # one layer's recomputed intermediates in the backward pass
  logits: int  # the LM head's logits and their gradient (a chunk at a time when chunked)
  self_reflection: int  # the stop-gradient prefix's keys/values and the continuations'
  gathered_weights: int = 0  # FSDP: a layer's weights whole (and the next's), and the LM head

  @property
  def total(self) -> int:
    return sum(dataclasses.astuple(self))

  @property
  def temporaries(self) -> int:
    """What XLA reports as temp: everything but the (donated) parameters and optimizer state."""
    return self.total - self.parameters - self.optimizer

  def as_gb(self) -> dict:
    out = {k: round(v / GB, 3) for k, v in dataclasses.asdict(self).items()}
    out["total"] = round(self.total / GB, 3)
    return out


def _layer_dims(cfg, tensor: int) -> tuple[int, int, int, int]:
  """(d_model, query width, key/value width, MLP width) per device."""
  q = cfg.n_heads * cfg.head_dim
  kv = cfg.n_kv_heads * cfg.head_dim
  return cfg.d_model, q // tensor, kv // tensor, cfg.d_ff // tensor


def kept_per_token(cfg, remat: str, tensor: int, seq: int, attention_parts: int = 1) -> int:
  """Bytes one token keeps per layer for the backward pass under a remat policy; a token after a
  context (self-reflection's continuations) has two attention parts."""
  item = np.dtype(cfg.dtype).itemsize
  d, q, kv, f = _layer_dims(cfg, tensor)
  heads = max(cfg.n_heads // tensor, 1)
  kept = {
      "full": d * item,  # the block's input
      # + the flash attention's rotated q, k, v and each part's output and float32 log-sum-exp
      # per head (the CPU form; the fused kernel keeps q, k, v and the output)
      "save_attention": (d + q + 2 * kv + attention_parts * q) * item + attention_parts * heads * 4,
      "minimal": (d + q + 2 * kv + d + 2 * f + d) * item,  # + every weight matmul's output
  }
  if remat in kept:
    return kept[remat]
  return working_per_token(cfg, tensor, seq)


def working_per_token(
    cfg, tensor: int, seq: int, block: int = ATTENTION_BLOCK, native: bool = False
) -> int:
  """Bytes per token of everything one layer computes: what no remat keeps, and what one
  layer's recompute holds at once. Norms (float32 input and normalised output, twice); q, k, v
  and their float32 rotary terms; each query block's inputs to the blockwise attention (its
  queries and the keys/values up to it: (blocks + 1) / 2 times the sequence's); the attention
  output, its projection and the residual; the MLP's gate, activation, its sigmoid, up and
  product, and the down projection. The `native` CPU kernel reads its inputs in place (its own
  scratch is per thread and small)."""
  item = np.dtype(cfg.dtype).itemsize
  d, q, kv, f = _layer_dims(cfg, tensor)
  blocks = math.ceil(seq / block)
  norms = 2 * d * 4 + 2 * d * item
  attention = (
      (q + 2 * kv) * item
      + (q + kv) * (item + 2 * 4)
      + q * item
      + (0 if native else (blocks + 1) / 2 * 2 * kv * item)
      + q * item
      + 2 * d * item
  )
  mlp = 5 * f * item + d * item
  return int(norms + attention + mlp)


def attention_scores(
    cfg,
    groups: int,
    rows_per_group: int,
    queries: int,
    keys: int,
    tensor: int,
    block: int = ATTENTION_BLOCK,
    tile_bytes: int = 0,
) -> int:
  """One layer's three float32 scores-sized buffers (scores, probabilities, their gradients) for
  `queries` queries over the keys each can see, the first `keys` - `queries` of which are a
  prefix seen by all: a block of at most `block` queries reads the keys up to its end, and XLA
  keeps every block's buffers live at once (the blocks are unrolled, not sequenced), for one
  tile of rows (`row_tiles`: the attention maps over tiles of the device's rows)."""
  if not groups:
    return 0
  heads = max(cfg.n_heads // tensor, 1)
  tile_rows = (
      groups
      // row_tiles(groups, rows_per_group, heads, queries, keys, block, tile_bytes)
      * rows_per_group
  )
  prefix = keys - queries
  seen = sum((end - start) * (prefix + end) for start, end, _ in query_blocks(queries, block, 0))
  return 3 * 4 * tile_rows * heads * seen


def train_memory(
    cfg,
    shape: StepShape,
    parameters: int,
    optimizer: int,
    remat: str,
    layer_bytes: int = 0,
    head_bytes: int = 0,
    gradients: int | None = None,
) -> TrainMemory:
  """The train step's bytes per device; `parameters` and `optimizer` are the exact per-device
  bytes from their shardings; `gradients` those of what is trained (None: every parameter;
  LoRA: the float32 adapters); `layer_bytes` and `head_bytes` are one layer's and the LM head's
  weights gathered over fsdp (split over tensor only), which an FSDP step holds whole while it
  uses them."""
  k = shape.microbatches
  rows = math.ceil(shape.batch / k / shape.row_shards)
  sr_rows = math.ceil(shape.sr_rows / k / shape.row_shards) if shape.sr_rows else 0
  item = np.dtype(cfg.dtype).itemsize
  tokens = rows * shape.seq_len
  cont_tokens = shape.continuations * sr_rows * shape.continuation_len
  native = shape.native_attention
  activations = cfg.n_layers * (
      kept_per_token(cfg, remat, shape.tensor, shape.seq_len) * tokens
      + kept_per_token(cfg, remat, shape.tensor, shape.continuation_len, 1 if native else 2)
      * cont_tokens
  )
  working = max(
      working_per_token(cfg, shape.tensor, shape.seq_len, native=native) * tokens,
      working_per_token(cfg, shape.tensor, shape.continuation_len, native=native) * cont_tokens,
  )
  if not native:
    # the XLA form: every query in one block, all rows at once; the blockwise form: blocks, tiles
    whole = (shape.seq_len + shape.prefix_len, 1 << 60) if shape.full_scores else ()
    working += max(
        attention_scores(cfg, rows, 1, shape.seq_len, shape.seq_len, shape.tensor, *whole),
        attention_scores(
            cfg,
            sr_rows,
            shape.continuations,
            shape.continuation_len,
            shape.prefix_len + shape.continuation_len,
            shape.tensor,
            *whole,
        ),
    )
  vocab = cfg.vocab_size // shape.tensor
  logit_tokens = rows * (shape.loss_chunk_tokens or shape.seq_len)
  logits = 3 * 4 * vocab * logit_tokens
  _, _, kv, _ = _layer_dims(cfg, shape.tensor)
  prefix_context = 2 * cfg.n_layers * sr_rows * shape.prefix_len * kv * item
  gathered = 2 * layer_bytes + head_bytes if shape.fsdp > 1 else 0
  # accumulating: the float32 sums beside one slice's gradients
  if gradients is None:
    gradients, sums = parameters, parameters * 4 // np.dtype(cfg.param_dtype).itemsize
  else:
    sums = gradients
  return TrainMemory(
      parameters=parameters,
      gradients=gradients + (sums if k > 1 else 0),
      optimizer=optimizer,
      gathered_weights=gathered,
      activations=activations,
      layer_working=working,
      logits=logits,
      self_reflection=prefix_context,
  )


def largest_batch(
    cfg,
    shape: StepShape,
    parameters: int,
    optimizer: int,
    remat: str,
    budget: int,
    layer_bytes: int = 0,
    head_bytes: int = 0,
    gradients: int | None = None,
) -> int:
  """The largest global batch (a multiple of the row shards, self-reflection rows scaled
  alike) whose step fits `budget` bytes per device; 0 when not even one row per device does."""
  best = 0
  rows = shape.row_shards * shape.microbatches
  while True:
    scaled = dataclasses.replace(
        shape,
        batch=rows,
        sr_rows=min(rows, shape.sr_rows * rows // max(shape.batch, 1)) if shape.sr_rows else 0,
    )
    if (
        train_memory(
            cfg, scaled, parameters, optimizer, remat, layer_bytes, head_bytes, gradients
        ).total
        > budget
    ):
      return best
    best = rows
    if rows >= 1 << 16:
      return best
    rows += shape.row_shards * shape.microbatches


def worst_case_shape(
    train_cfg, mesh_shape: dict, native_attention: bool = False, full_scores: bool = False
) -> StepShape:
  """The largest step a config can make: every row at `train.max_seq_len`, every
  self-reflection row with a full prefix and `train.max_continuation_len` continuations."""
  t = train_cfg
  cont = t.max_continuation_len
  return StepShape(
      batch=t.batch_size,
      seq_len=t.max_seq_len,
      sr_rows=t.sr_batch_size or t.batch_size,
      prefix_len=max(t.max_seq_len - cont, 8),
      continuation_len=cont,
      loss_chunk_tokens=t.loss_chunk_tokens,
      row_shards=mesh_shape["data"] * mesh_shape["fsdp"],
      tensor=mesh_shape["tensor"],
      fsdp=mesh_shape["fsdp"],
      continuations=2 if t.get("sr_reuse_lm_forward", False) else 3,
      native_attention=native_attention,
      full_scores=full_scores,
      microbatches=max(t.get("microbatches", 1), 1),
  )


def microbatch_counts(shape: StepShape) -> list[int]:
  """The slice counts a step can take: dividing its LM and self-reflection rows, each slice's
  LM rows spread evenly over the row shards."""
  return [
      k
      for k in range(1, shape.batch + 1)
      if shape.batch % k == 0
      and shape.sr_rows % k == 0
      and (shape.batch // k) % shape.row_shards == 0
  ]


def refusal(plan: TrainMemory, budget: int, shape: StepShape, remat: str, batch: int) -> str:
  """The one-paragraph error for a step that does not fit: the numbers, and the largest
  `batch` that would."""
  parts = ", ".join(f"{k} {v:.2f}" for k, v in plan.as_gb().items() if k != "total")
  advice = (
      f"the largest train.batch_size that fits is {batch}"
      if batch
      else "not even one row per device fits: shard the weights wider (mesh.fsdp)"
  )
  if shape.microbatches > 1:
    advice += f" (in {shape.microbatches} microbatches)"
  else:
    advice += "; train.microbatches=0 slices the batch until it fits"
  if remat != "full":
    advice += "; model.remat=full keeps only each block's input"
  return (
      f"the train step needs {plan.total / GB:.2f} GB per device ({parts} GB; "
      f"batch {shape.batch} x {shape.seq_len} tokens, model.remat={remat}) but the budget is "
      f"{budget / GB:.2f} GB (train.memory_budget_gb; 0: the device's memory, -1: no check); "
      f"{advice}"
  )


@dataclasses.dataclass(frozen=True)
class StateBytes:
  """Per device: parameters and optimizer state (from their shardings), and what an FSDP step
  gathers while it uses them (one layer's weights and the LM head's, split over tensor only)."""

  parameters: int
  optimizer: int
  layer: int = 0
  head: int = 0
  gradients: int | None = None  # what is trained, when not every parameter (LoRA adapters)


def _nbytes(tree, shardings=None) -> int:
  leaves = jax_leaves(tree)
  if shardings is None:
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in leaves)
  return sum(
      int(np.prod(s.shard_shape(a.shape), dtype=np.int64)) * np.dtype(a.dtype).itemsize
      for a, s in zip(leaves, jax_leaves(shardings))
  )


def state_bytes(
    abstract_params, param_shardings, abstract_opt, opt_shardings, n_layers: int, tensor: int
) -> StateBytes:
  """The StateBytes of abstract (shape/dtype) parameter and optimizer trees on their
  shardings."""
  if is_stacked(abstract_params):
    layer = _nbytes(abstract_params[LAYERS]) // n_layers
  else:
    layer = _nbytes(abstract_params.get("layer_0", {}))
  head = _nbytes({k: v for k, v in abstract_params.items() if k in ("lm_head", "embedding")})
  gradients = None
  if lora.has_adapters(abstract_params):
    gradients = _nbytes(lora.split(abstract_params)[1], lora.split(param_shardings)[1])
  return StateBytes(
      _nbytes(abstract_params, param_shardings),
      _nbytes(abstract_opt, opt_shardings),
      layer // tensor,
      head // tensor,
      gradients,
  )


@dataclasses.dataclass(frozen=True)
class Planner:
  """One trainer's step as the planner sees it: the model, the config's worst-case step shape
  and the train state's bytes per device."""

  model_cfg: object
  shape: StepShape
  state: StateBytes

  def plan(self) -> TrainMemory:
    return train_memory(
        self.model_cfg,
        self.shape,
        self.state.parameters,
        self.state.optimizer,
        self.model_cfg.remat,
        self.state.layer,
        self.state.head,
        self.state.gradients,
    )

  def largest_batch(self, budget: int) -> int:
    return largest_batch(
        self.model_cfg,
        self.shape,
        self.state.parameters,
        self.state.optimizer,
        self.model_cfg.remat,
        budget,
        self.state.layer,
        self.state.head,
        self.state.gradients,
    )

  def with_microbatches(self, k: int) -> "Planner":
    return dataclasses.replace(self, shape=dataclasses.replace(self.shape, microbatches=k))

  def fewest_microbatches(self, budget: int) -> int:
    """The fewest slices of the rows whose step fits `budget` bytes per device; 0: none."""
    for k in microbatch_counts(self.shape):
      if self.with_microbatches(k).plan().total <= budget:
        return k
    return 0

  def check(self, budget_gb: float, device_bytes) -> None:
    """Refuses (ConfigError, naming the numbers and the batch that would fit) a step that
    cannot fit `budget_gb` per device (0: `device_bytes()`, the device's memory; < 0: no
    check)."""
    if budget_gb < 0:
      return
    budget = int(budget_gb * GB) if budget_gb else device_bytes()
    plan = self.plan()
    logging.info("train step plan per device: %s GB; budget %.2f GB", plan.as_gb(), budget / GB)
    if plan.total > budget:
      raise ConfigError(
          refusal(plan, budget, self.shape, self.model_cfg.remat, self.largest_batch(budget))
      )
