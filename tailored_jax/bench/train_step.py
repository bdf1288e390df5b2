"""`python -m tailored_jax.bench.train_step [--model=llama_34m] [--shapes=8x128,8x256,8x512]`:
our jitted train step against transformers' `LlamaForCausalLM` + `torch.optim.AdamW` on the
same config and the same batch, side by side in one process (float32, median of `--repeats`
after a warm-up), each with the LM loss alone and with the triplet self-reflection loss on every
row. Prints JSON per shape and side: tokens/s, seconds per step, the first call's excess over a
steady step (compilation on our side), model FLOP/s as a share of each library's measured
matmul peak, and peak resident memory (the process's high-water mark, reset before each run;
Linux); and the ratios ours ÷ torch and self-reflection ÷ LM.

A shape `BxT` (or `BxT:P`) is B training strings of T tokens, each a P-token prefix (default
T/2) and a (T−P)-token continuation; self-reflection rows share the prefix and continue it with
an anchor (the string's own continuation), a positive and a negative of T−P tokens each. Ours
runs METHOD §3 as written (`ours_self_reflection`: a stop-gradient prefix pass and three
continuations) and reusing the LM forward (`ours_self_reflection_reusing_lm`,
`train.sr_reuse_lm_forward`: positive and negative only); torch runs the release's way (a
no-grad prefix pass, then the three continuations with gradient over its cache).

`--lora_rank=R`: both sides train rank-R adapters on every projection (alpha 2R; torch through
peft, AdamW over the adapters), LM loss only, and ours also runs the full fine-tune
(`ours_lm_full_finetune_over_lm`: full ÷ LoRA seconds per step; peak RSS per run).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import ml_collections
import numpy as np

from tailored_jax import config_lib, sharding
from tailored_jax.bench.common import PRESETS, median_seconds, report, torch_model
from tailored_jax.data.batching import LMBatch, ReflectionBatch
from tailored_jax.models import for_devices, layers
from tailored_jax.models.llama import Llama, LlamaConfig
from tailored_jax.train.throughput import measured_matmul_tflops
from tailored_jax.train.trainer import Trainer

SR_WEIGHT, SR_MARGIN, LR = 0.5, 1.0, 1e-5
TORCH_MODULES = dict(
    q="q_proj", k="k_proj", v="v_proj", o="o_proj", gate="gate_proj", up="up_proj", down="down_proj"
)


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  seq: int
  prefix: int

  @property
  def continuation(self) -> int:
    return self.seq - self.prefix

  def __str__(self) -> str:  # BxT:P, the benchmark's key for this shape
    return f"{self.batch}x{self.seq}:{self.prefix}"

  @classmethod
  def parse(cls, text: str) -> "Shape":
    size, _, prefix = text.partition(":")
    try:
      b, t = (int(x) for x in size.split("x"))
      p = int(prefix) if prefix else t // 2
    except ValueError:
      raise ValueError(f"--shapes: {text!r} is not BxT or BxT:P (e.g. 8x512:384)") from None
    if not 0 < p < t:
      raise ValueError(f"--shapes: {text!r}: the prefix must be shorter than the string")
    return cls(b, t, p)


@dataclasses.dataclass(frozen=True)
class Work:
  """One shape's token arrays, shared by both sides: `tokens` [b, t + 1] (the strings, each
  then its next token), positives and negatives [b, t − p]."""

  shape: Shape
  tokens: np.ndarray
  positives: np.ndarray
  negatives: np.ndarray

  @classmethod
  def random(cls, shape: Shape, vocab: int, seed: int = 0) -> "Work":
    rng = np.random.default_rng(seed)
    draw = lambda *s: rng.integers(3, vocab, s).astype(np.int32)
    return cls(
        shape,
        draw(shape.batch, shape.seq + 1),
        draw(shape.batch, shape.continuation),
        draw(shape.batch, shape.continuation),
    )

  def continuations(self) -> np.ndarray:
    """[b, 3, t − p]: anchor (the string's own continuation), positive, negative."""
    anchor = self.tokens[:, self.shape.prefix : self.shape.seq]
    return np.stack([anchor, self.positives, self.negatives], axis=1)

  def ours(self) -> tuple[LMBatch, ReflectionBatch]:
    """Every row a training string (its last token read, as when reusing the LM forward) and a
    self-reflection row on LM row r."""
    s = self.shape
    ones = np.ones((s.batch, s.seq), bool)
    lm = LMBatch(self.tokens[:, :-1], self.tokens[:, 1:], ones, ones, ones.astype(np.float32))
    reflection = ReflectionBatch(
        self.tokens[:, : s.prefix],
        np.ones((s.batch, s.prefix), bool),
        self.continuations(),
        np.ones((s.batch, 3, s.continuation), bool),
        np.ones((s.batch,), np.float32),
    )
    return lm, reflection


def matmul_peak_gflops(side: str, n: int = 1024, repeats: int = 10) -> float:
  """Float32 [n, n] @ [n, n] GFLOP/s of jnp (the peak the trainer's MFU line uses) or torch on
  this machine (median)."""
  if side == "ours":
    return measured_matmul_tflops("float32", n) * 1e3
  import torch

  a = torch.randn(n, n)
  return 2 * n**3 / median_seconds(lambda: a @ a, repeats)[1] / 1e9


def parameter_count(cfg: LlamaConfig) -> int:
  """The model's parameters, from their shapes (nothing allocated)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layers.abstract_params(Llama(cfg))))


def model_flops_per_token(cfg: LlamaConfig, n_params: int, seq: int) -> float:
  """Training FLOPs per token: 6 · parameters, plus causal attention's scores and weighted sum
  (6 · layers · seq · heads · head_dim: half of the full square's 12)."""
  return 6.0 * n_params + 6.0 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim


def _reset_peak_rss() -> int:
  """Resets the process's resident high-water mark; returns the current resident bytes."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def with_peak_memory(run):
  """`run()`'s result with its peak resident bytes, and the peak above the bytes at its start."""
  start = _reset_peak_rss()
  result = run()
  peak = _status_bytes("VmHWM")
  return dict(result, peak_rss_gb=peak / 1e9, peak_rss_above_start_gb=(peak - start) / 1e9)


def train_cfg(
    loss_chunk_tokens: int = 0, reuse: bool = False, guard: bool = True
) -> ml_collections.ConfigDict:
  t = config_lib.base_config().train
  t.lr, t.warmup_steps, t.loss_chunk_tokens = LR, 0, loss_chunk_tokens
  t.sr_weight, t.sr_margin, t.sr_reuse_lm_forward = SR_WEIGHT, SR_MARGIN, reuse
  t.max_nonfinite_steps = t.max_nonfinite_steps if guard else 0
  return t


def ours(
    cfg: LlamaConfig,
    work: Work,
    repeats: int,
    *,
    self_reflection: bool,
    reuse: bool = False,
    guard: bool = True,
    loss_chunk_tokens: int = 0,
) -> dict:
  mesh = sharding.make_mesh(
      ml_collections.ConfigDict({"mesh": dict(data=-1, fsdp=1, tensor=1, num_devices=1)})
  )
  trainer = Trainer(Llama(cfg), train_cfg(loss_chunk_tokens, reuse, guard), mesh)
  state = {"s": trainer.new_state(trainer.init_params(0))}
  lm, reflection = (trainer.put_batch(x) for x in work.ours())
  reflection = reflection if self_reflection else None
  step_fn = trainer.step_fn()

  def step():
    state["s"], metrics = step_fn(state["s"], lm, reflection)
    jax.block_until_ready(metrics)

  first, seconds = median_seconds(step, repeats)
  return {"first_call_s": first, "seconds_per_step": seconds}


def torch_triplet_loss(model, prefix, continuations):
  """The release's self-reflection: the prefix once without gradient, then anchor, positive and
  negative (rows [b, 3, c]) with gradient over its repeated cache; cosine triplet on the final
  hidden state at the last token."""
  import torch

  b, k, c = continuations.shape
  p = prefix.shape[1]
  with torch.no_grad():
    cache = model.model(input_ids=prefix, use_cache=True).cache
  cache.batch_repeat_interleave(k)
  positions = torch.arange(p, p + c, device=prefix.device).expand(b * k, c)
  hidden = (
      model.model(input_ids=continuations.reshape(b * k, c), position_ids=positions, cache=cache)
      .last_hidden_state[:, -1]
      .reshape(b, k, -1)
  )
  cos = torch.nn.functional.cosine_similarity
  anchor, positive, negative = hidden.unbind(1)
  return torch.clamp(SR_MARGIN - cos(anchor, positive) + cos(anchor, negative), min=0).mean()


def theirs(
    cfg: LlamaConfig, work: Work, repeats: int, *, self_reflection: bool, device: str = "cpu"
) -> dict:
  """transformers' step: float32 weights and AdamW; with `cfg.dtype` bfloat16, its forward under
  torch's bf16 autocast (the usual mixed precision, as ours keeps float32 masters)."""
  import contextlib

  import torch

  model = torch_model(cfg).to(device)
  if cfg.lora_rank:  # peft's LoRA on the same projections, AdamW over the adapters alone
    import peft

    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=[TORCH_MODULES[t] for t in cfg.lora_targets],
        ),
    )
  optimizer = torch.optim.AdamW(
      [p for p in model.parameters() if p.requires_grad],
      lr=LR,
      betas=(0.9, 0.999),
      eps=1e-8,
      weight_decay=0.01,
  )
  tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)
  inputs, targets = tensor(work.tokens[:, :-1]), tensor(work.tokens[:, 1:])
  prefix, continuations = tensor(work.tokens[:, : work.shape.prefix]), tensor(work.continuations())

  autocast = contextlib.nullcontext
  if cfg.dtype != "float32":
    autocast = lambda: torch.autocast(device.split(":")[0], dtype=getattr(torch, cfg.dtype))

  def step():
    with autocast():
      logits = model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(
          logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
      )
      if self_reflection:
        loss = loss + SR_WEIGHT * torch_triplet_loss(model, prefix, continuations)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device != "cpu":
      torch.cuda.synchronize()

  first, seconds = median_seconds(step, repeats)
  return {"first_call_s": first, "seconds_per_step": seconds}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--model", default="llama_34m", choices=sorted(PRESETS))
  parser.add_argument("--shapes", default="8x128,8x256,8x512", help="BxT or BxT:P, comma-separated")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch_device", default="cpu", help="cpu, or cuda beside a JAX GPU")
  parser.add_argument(
      "--remat",
      default="full",
      choices=config_lib.REMAT_POLICIES,
      help="ours: what each block keeps for the backward pass",
  )
  parser.add_argument("--scan_layers", type=int, default=1, help="ours: nn.scan over layers")
  parser.add_argument(
      "--attention",
      default="auto",
      choices=config_lib.ATTENTION,
      help="ours: the training attention (model.attention; on CPU 'auto' is the native kernel)",
  )
  parser.add_argument(
      "--loss_chunk_tokens",
      type=int,
      default=0,
      help="ours: LM-head logits this many positions at a time (0: all)",
  )
  parser.add_argument(
      "--side",
      default="both",
      choices=["both", "ours", "torch"],
      help="one side alone, e.g. to read its peak RSS with /usr/bin/time -v",
  )
  parser.add_argument("--lm_only", action="store_true", help="no self-reflection runs")
  parser.add_argument(
      "--lora_rank",
      type=int,
      default=0,
      help="LoRA on every projection at this rank, both sides (torch: peft), LM loss only; "
      "ours also fully fine-tuned for the LoRA ÷ full ratio",
  )
  parser.add_argument(
      "--guard_cost",
      action="store_true",
      help="also ours with self-reflection and no non-finite guard",
  )
  args = parser.parse_args(argv)
  try:
    shapes = [Shape.parse(text) for text in args.shapes.split(",")]
  except ValueError as e:
    parser.error(str(e))
  cfg = dataclasses.replace(
      PRESETS[args.model],
      remat=args.remat,
      scan_layers=bool(args.scan_layers),
      attention=args.attention,
  )
  cfg = for_devices(Llama(cfg), jax.devices()).cfg
  full_cfg = cfg
  if args.lora_rank:
    args.lm_only = True
    cfg = dataclasses.replace(
        cfg,
        lora_rank=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank,
        lora_targets=tuple(TORCH_MODULES),
    )
  n_params = parameter_count(full_cfg)
  sides = ("ours", "torch") if args.side == "both" else (args.side,)
  peaks = {side: matmul_peak_gflops(side) for side in sides}
  chunk = args.loss_chunk_tokens
  ours_run = functools.partial(ours, cfg, repeats=args.repeats, loss_chunk_tokens=chunk)
  torch_run = functools.partial(theirs, cfg, repeats=args.repeats, device=args.torch_device)
  runs = {  # side -> variant -> run(work)
      "ours": {"lm": functools.partial(ours_run, self_reflection=False)},
      "torch": {"lm": functools.partial(torch_run, self_reflection=False)},
  }
  if args.lora_rank:
    runs["ours"]["lm_full_finetune"] = functools.partial(
        ours, full_cfg, repeats=args.repeats, loss_chunk_tokens=chunk, self_reflection=False
    )
  if not args.lm_only:
    runs["ours"].update(
        self_reflection=functools.partial(ours_run, self_reflection=True),
        self_reflection_reusing_lm=functools.partial(ours_run, self_reflection=True, reuse=True),
    )
    runs["torch"]["self_reflection"] = functools.partial(torch_run, self_reflection=True)
    if args.guard_cost:
      runs["ours"]["self_reflection_without_nonfinite_guard"] = functools.partial(
          ours_run, self_reflection=True, guard=False
      )
  rows = {}
  for shape in shapes:
    work = Work.random(shape, cfg.vocab_size)
    flops_per_token = model_flops_per_token(cfg, n_params, shape.seq)
    row = {}
    for side in sides:
      for name, run in runs[side].items():
        result = with_peak_memory(lambda run=run: run(work))
        seconds = result["seconds_per_step"]
        # tokens/s counts the LM strings' tokens: the work both losses are paid for
        tokens_per_s = shape.batch * shape.seq / seconds
        result.update(
            tokens_per_s=tokens_per_s, first_call_excess_s=result["first_call_s"] - seconds
        )
        if name == "lm":
          result["model_gflops"] = tokens_per_s * flops_per_token / 1e9
          result["share_of_matmul_peak"] = result["model_gflops"] / peaks[side]
        row[f"{side}_{name}"] = result
    seconds = lambda key: row[key]["seconds_per_step"]
    rate = lambda key: row[key]["tokens_per_s"]
    for side in sides:
      for name in runs[side]:
        if name != "lm":
          row[f"{side}_{name}_over_lm"] = seconds(f"{side}_{name}") / seconds(f"{side}_lm")
    if len(sides) == 2:
      for name in runs["torch"]:
        row[f"ours_over_torch_{name}_tokens_per_s"] = rate(f"ours_{name}") / rate(f"torch_{name}")
      if "ours_self_reflection_reusing_lm" in row:
        row["ours_reusing_lm_over_torch_self_reflection_tokens_per_s"] = rate(
            "ours_self_reflection_reusing_lm"
        ) / rate("torch_self_reflection")
    rows[str(shape)] = row
  torch_info = {}
  if "torch" in sides:
    import torch

    torch_info = dict(
        torch_threads=torch.get_num_threads(),
        torch_device=args.torch_device,
        torch_version=torch.__version__,
    )
  report(
      "train_step",
      model=args.model,
      parameters=n_params,
      dtype="float32",
      sr_weight=SR_WEIGHT,
      ours_remat=args.remat,
      ours_scan_layers=bool(args.scan_layers),
      ours_attention=cfg.attention,
      ours_loss_chunk_tokens=chunk,
      lora_rank=args.lora_rank,
      lora_alpha=cfg.lora_alpha if args.lora_rank else None,
      repeats=args.repeats,
      matmul_peak_gflops=peaks,
      **torch_info,
      shapes=rows,
      lm_tokens_per_s_change=lm_throughput_change(shapes, rows, sides),
  )


def lm_throughput_change(shapes: list[Shape], rows: dict, sides) -> dict:
  """Per longer shape, each side's LM tokens/s over its rate at the shortest shape of the same
  batch, minus 1 (the issue's "drops no more than torch's" reads these side by side)."""
  rate = lambda shape, side: rows[str(shape)][f"{side}_lm"]["tokens_per_s"]
  changes = {}
  for shape in shapes:
    shortest = min((s for s in shapes if s.batch == shape.batch), key=lambda s: s.seq)
    if shape.seq > shortest.seq:
      changes[f"{shape} from {shortest}"] = {
          side: rate(shape, side) / rate(shortest, side) - 1 for side in sides
      }
  return changes


if __name__ == "__main__":
  main()
