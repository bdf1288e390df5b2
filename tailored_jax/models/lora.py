"""LoRA (Hu et al., 2021): low-rank adapters beside frozen base weights, in a few lines of Flax.

A targeted weight W [in..., out...] gets A [in..., r] and B [r, out...] (parameters
`<name>_lora_a`, `<name>_lora_b`, float32 whatever the base's dtype), and its layer computes
x·W + (alpha / r)·(x·A)·B. B starts at zero, so a fresh adapter changes nothing; A starts as
PEFT's (Kaiming-uniform with a = √5: U(±1/√fan_in)). Training differentiates the adapters
alone (`split`, `join`); decoding and export fold them into W once (`merged`).

Not qwix's LoRA provider: it finds a layer's weight by the identity of a `dot_general`'s right
operand with a module parameter, and our weights are cast and reshaped (multi-axis heads)
before their matmul, so it would find none of them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

SUFFIXES = ("_lora_a", "_lora_b")


def parse_targets(text: str) -> tuple[str, ...]:
  """'q, v' -> ('q', 'v') (validated by config_lib)."""
  return tuple(t.strip() for t in str(text).split(",") if t.strip())


def _key(entry) -> str:
  return str(getattr(entry, "key", entry))


def is_adapter(path) -> bool:
  """Whether a tree path (keys, or jax key entries; a boxed leaf's ends in its value) is an
  adapter's."""
  return any(_key(k).endswith(SUFFIXES) for k in path)


def _filter(tree: dict, keep, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = _filter(v, keep, prefix + (k,))
      if sub:
        out[k] = sub
    elif keep(prefix + (k,)):
      out[k] = v
  return out


def split(params: dict) -> tuple[dict, dict]:
  """(base, adapters): the parameter tree's frozen weights and its LoRA weights, each a tree of
  the same nesting holding only its leaves."""
  return _filter(params, lambda p: not is_adapter(p)), _filter(params, is_adapter)


def join(base: dict, adapters: dict) -> dict:
  out = dict(base)
  for k, v in adapters.items():
    out[k] = join(out.get(k, {}), v) if isinstance(v, dict) else v
  return out


def has_adapters(params) -> bool:
  return any(is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def merged(params: dict, scale: float) -> dict:
  """The tree without adapters, each adapted weight replaced by W + scale · A·B (in W's dtype;
  stacked layers, a leading axis on all three, merged per layer)."""

  def fold(node: dict) -> dict:
    out = {}
    for k, v in node.items():
      if isinstance(v, dict):
        out[k] = fold(v)
      elif not k.endswith(SUFFIXES):
        a, b = node.get(f"{k}_lora_a"), node.get(f"{k}_lora_b")
        out[k] = v if a is None else (v + scale * product(a, b, v.ndim)).astype(v.dtype)
    return out

  return fold(params)


def folded(params: dict, cfg) -> dict:
  """The weights decoding and export use: a quantised base dequantised (in the compute dtype),
  then `merged` at the model config's scale (alpha / r); the tree as it is without either."""
  if cfg.base_quantization != "none":
    from tailored_jax.models import quantize

    params = quantize.dequantized(params, cfg.base_quantization, jnp.dtype(cfg.dtype))
  return merged(params, cfg.lora_alpha / cfg.lora_rank) if has_adapters(params) else params


def product(a, b, w_ndim: int) -> jax.Array:
  """A·B in W's shape (float32): A [lead..., in..., r], B [lead..., r, out...]."""
  lead = a.ndim + b.ndim - 2 - w_ndim
  rank = a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(*a.shape[:lead], -1, rank)
  b2 = b.astype(jnp.float32).reshape(*b.shape[:lead], rank, -1)
  return (a2 @ b2).reshape(*a.shape[:-1], *b.shape[lead + 1 :])


def adapter_delta(module: nn.Module, name: str, x_bi, in_shape, out_shape, in_axes, out_axes, cfg):
  """(alpha / r)·(x·A)·B for weight `name` of `module` ([in..., out...]; `x_bi` flattened over
  the input axes, dropped out at `lora_dropout` when the call has a 'dropout' rng), creating A
  and B; the rank axis is replicated (A and B are small)."""
  from tailored_jax.models.layers import dense, param  # layers imports this module

  rank, dt = cfg.lora_rank, jnp.dtype(cfg.dtype)
  if cfg.lora_dropout > 0 and module.has_rng("dropout"):  # training steps give the rng
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.lora_dropout, x_bi.shape)
    x_bi = jnp.where(keep, x_bi / (1.0 - cfg.lora_dropout), 0).astype(x_bi.dtype)
  fan_in = tuple(range(len(in_shape)))
  a = param(
      module,
      f"{name}_lora_a",
      (*in_shape, rank),
      (*in_axes, None),
      jnp.float32,
      nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=fan_in, out_axis=-1),
  )
  b = param(
      module,
      f"{name}_lora_b",
      (rank, *out_shape),
      (None, *out_axes),
      jnp.float32,
      nn.initializers.zeros,
  )
  x_br = dense(x_bi, a.reshape(-1, rank).astype(dt), cfg.platform)
  return dense(x_br, b.astype(dt), cfg.platform) * jnp.asarray(cfg.lora_alpha / rank, dt)


def targeted(cfg, target: str) -> bool:
  return cfg.lora_rank > 0 and target in cfg.lora_targets
