"""Model pieces every family shares: how a model runs (`Execution`), the parameter helper,
initialisation on dummy tokens, the weight matmul, the layer stack and its remat policies, and
the HF tensor-table entry. Attention lives in `models/attention/`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax.config_lib import REMAT_POLICIES
from tailored_jax.models import lora
from tailored_jax.models.annotations import constrain
from tailored_jax.models.attention.cached import LayerKV
from tailored_jax.models.attention.contexts import ContextKV, KeptKV
from tailored_jax.models.attention.masks import attention_mask, context_mask
from tailored_jax.models.attention.names import FLASH_INPUTS, FLASH_OUTPUTS, FUSED_NAMES
from tailored_jax.models.kv_cache import Context, KVCache, write_at


@dataclasses.dataclass(frozen=True, kw_only=True)
class Execution:
  """How a model runs, whatever its architecture, declared once: every family's config
  inherits these fields, and `execution_of` reads them from a config's `model` section."""

  dtype: str = "float32"  # activation/compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # config_lib.REMAT_POLICIES
  scan_layers: bool = False  # one nn.scan over stacked layers
  attention: str = "auto"  # the training attention: attention.dispatch.REQUESTS, then resolved
  kv_cache_dtype: str = ""  # the decode cache's ('' = dtype)
  platform: str = ""  # the devices the step compiles for, set with `attention` by `resolve`
  devices: int = 0  # how many, set with `platform`
  lora_rank: int = 0  # > 0: rank-r adapters beside the targeted projections (`models/lora.py`)
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()
  lora_dropout: float = 0.0  # on an adapter's input, in training steps (a 'dropout' rng given)
  base_quantization: str = "none"  # QLoRA: projection weights stored int8 / nf4 (`quantize.py`)


def execution_of(model_section) -> dict:
  """The `Execution` fields a config's `model` section sets, as keyword arguments (the platform
  is set when the attention is resolved for the step's devices)."""
  fields = (f.name for f in dataclasses.fields(Execution) if f.name not in ("platform", "devices"))
  out = {name: model_section[name] for name in fields}
  out["lora_targets"] = lora.parse_targets(out["lora_targets"])
  return out


def param(module: nn.Module, name: str, shape: tuple, axes: tuple, dtype, init) -> jax.Array:
  """A parameter carrying logical axis names (placed on the mesh by `sharding.py`'s rules)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def init_boxed_params(model: nn.Module, key) -> dict:
  """Parameters initialised on dummy tokens, still boxed with their logical axes."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  return model.init(key, tokens, tokens, jnp.ones((1, 8), bool))["params"]


def abstract_boxed_params(model: nn.Module) -> dict:
  """Shapes and dtypes of the parameters (nothing allocated), boxed with their logical axes."""
  return jax.eval_shape(lambda key: init_boxed_params(model, key), jax.random.PRNGKey(0))


def abstract_params(model: nn.Module) -> dict:
  """Shapes and dtypes of the parameters (nothing allocated), unboxed."""
  return nn.meta.unbox(abstract_boxed_params(model))


class HFTensor(NamedTuple):
  """One entry of a family's tensor table: where an HF tensor lives in our tree, its HF shape,
  and the two layout conversions. A fused HF tensor (GPT-2's `c_attn`) fills several of ours:
  `parts` names them, `to_ours` returns one array each and `to_hf` takes them in that order."""

  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  parts: tuple[tuple[str, ...], ...] = ()


def tree_get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def tree_set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def projection(module: nn.Module, name: str, target: str, x_bi, w, n_in: int, axes: tuple, cfg):
  """x·W for a weight `w` [in..., out...] (its first `n_in` axes the input, `x_bi` flattened
  over them; `axes` its logical names), plus its LoRA adapter when `target` is adapted."""
  dt = jnp.dtype(cfg.dtype)
  y = dense(x_bi, w.reshape(-1, *w.shape[n_in:]).astype(dt), cfg.platform)
  if lora.targeted(cfg, target):
    y = y + lora.adapter_delta(
        module, name, x_bi, w.shape[:n_in], w.shape[n_in:], axes[:n_in], axes[n_in:], cfg
    )
  return y


def dense(x_bi, w_i_, platform: str = ""):
  """x[..., i] @ w[i, ...] (a weight's trailing axes are the output's): every weight matmul of
  the models. On CPU it has its own gradient: XLA:CPU copies a matmul's left operand transposed
  when the contraction runs over its rows (a weight gradient's tokens), so the narrower of the
  input and the output gradient goes on the left (the weight-sized result transposed if need
  be). Autodiff's form copied [tokens, d_ff] activations transposed, fused with the SwiGLU's
  gradient: the MLP's forward and backward were 35% slower. Same values. `platform`: the
  devices the step compiles for (a resolved model config's `platform`)."""
  w_io = w_i_.reshape(w_i_.shape[0], -1)
  y_bo = _cpu_dense(x_bi, w_io) if platform == "cpu" else x_bi @ w_io
  return y_bo.reshape(x_bi.shape[:-1] + w_i_.shape[1:])


@jax.custom_vjp
def _cpu_dense(x_bi, w_io):
  return x_bi @ w_io


def _cpu_dense_fwd(x_bi, w_io):
  return x_bi @ w_io, (x_bi, w_io)


def _cpu_dense_bwd(residuals, dy_bo):
  x_bi, w_io = residuals
  rows = tuple(range(x_bi.ndim - 1))
  dx_bi = jax.lax.dot_general(dy_bo, w_io, (((dy_bo.ndim - 1,), (1,)), ((), ())))
  if w_io.shape[0] <= w_io.shape[1]:
    dw_io = jax.lax.dot_general(x_bi, dy_bo, ((rows, rows), ((), ())))
  else:
    dw_io = jax.lax.dot_general(dy_bo, x_bi, ((rows, rows), ((), ()))).T
  return dx_bi.astype(x_bi.dtype), dw_io.astype(w_io.dtype)


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


def merge_heads(x_btnh):
  """[batch, new, heads, head_dim] -> [batch, new, heads*head_dim], so the output projection is
  one plain matmul with its weight reshaped (no transposed copy of the weight per step)."""
  b, t, n, h = x_btnh.shape
  return x_btnh.reshape(b, t, n * h)


LAYERS = "layers"  # the stacked layers' key in a scanned model's parameters

# What a block keeps for the backward pass (model.remat): 'none' everything; 'full' only its
# input (the block is recomputed); 'minimal' the weight matmuls' outputs (norms, rotary,
# attention and activations recomputed); 'save_attention' what the attention's backward reads,
# tagged with `checkpoint_name`: the CPU flash form's inputs and outputs (`FLASH_INPUTS`,
# `FLASH_OUTPUTS`: it runs once), the fused kernel's inputs and output (`FUSED_NAMES`).


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"config field model.remat: {name!r} is not one of {list(REMAT_POLICIES)}")
  policies = jax.checkpoint_policies
  return {
      "full": policies.nothing_saveable,
      "minimal": policies.dots_with_no_batch_dims_saveable,
      "save_attention": policies.save_only_these_names(*FLASH_INPUTS, *FLASH_OUTPUTS, *FUSED_NAMES),
  }.get(name)


# Logical axes of activations: rows over the batch mesh axes, heads/MLP/vocabulary over tensor,
# the residual stream whole on each device ('act_embed': never the weights' fsdp split).
RESIDUAL = ("batch", "length", "act_embed")
MLP_HIDDEN = ("batch", "length", "mlp")
LOGITS = ("batch", "length", "vocab")


@flax.struct.dataclass
class _LayerContext:
  """A scanned layer's slice of a read-only training context (its mask is shared)."""

  k_gksh: jax.Array
  v_gksh: jax.Array


@flax.struct.dataclass
class _LayerCache:
  """A scanned layer's slice of the cache: its own buffers and its contexts' keys/values."""

  k_bksh: jax.Array
  v_bksh: jax.Array
  context_k: tuple
  context_v: tuple


class _ScannedLayer(nn.Module):
  """One block as a scan body: the block shares this module's scope, so a scanned model's
  parameters are `layers/<block's own names>` with a leading layer axis."""

  block_cls: type
  cfg: object
  keep_kv: int = 0  # training: keep the first tokens' keys and values (KeptKV)

  def setup(self):
    self.block = self.block_cls(self.cfg)
    nn.share_scope(self, self.block)

  def __call__(
      self, x_btd, positions_bt, valid_bt, shared, layer: _LayerCache | _LayerContext | None
  ):
    kv = KeptKV(self.keep_kv) if self.keep_kv else None
    if isinstance(layer, _LayerContext):
      kv = ContextKV(layer.k_gksh, layer.v_gksh, shared)
    elif layer is not None:
      index, mask_bts, context_masks = shared
      kv = LayerKV(
          layer.k_bksh,
          layer.v_bksh,
          index,
          mask_bts,
          layer.context_k,
          layer.context_v,
          context_masks,
      )
    x_btd, kv = self.block(x_btd, positions_bt, valid_bt, kv)
    stored = (kv.k_bksh, kv.v_bksh) if isinstance(kv, (LayerKV, KeptKV)) else None
    return constrain(x_btd, RESIDUAL), stored


def layer_config(cfg, i: int):
  """The config layer i runs with: the family's per-layer variant where it has one (GPT-Neo's
  local-attention layers, `for_layer`), else the model's."""
  for_layer = getattr(cfg, "for_layer", None)
  return for_layer(i) if for_layer is not None else cfg


def layer_windows(cfg, window: int) -> tuple[int, ...]:
  """Each layer's attention window (0: the whole causal context): `window` for every layer, or
  the family's per-layer windows."""
  if getattr(cfg, "for_layer", None) is None:
    return (window,) * cfg.n_layers
  return tuple(layer_config(cfg, i).window for i in range(cfg.n_layers))


def _check_uniform(cfg, window: int) -> None:
  if len(set(layer_windows(cfg, window))) > 1:
    raise ValueError(
        "layers with different attention windows (GPT-Neo's local layers) run one by one: "
        "set model.scan_layers=False"
    )


def _scan_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, shared, layer, keep_kv=0):
  body = _ScannedLayer
  if cfg.remat != "none":
    body = nn.remat(body, policy=remat_policy(cfg.remat), prevent_cse=False)
  scanned = nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
      length=cfg.n_layers,
      metadata_params={nn.PARTITION_NAME: LAYERS},
  )
  return scanned(block_cls, cfg, keep_kv, name=LAYERS)(x_btd, positions_bt, valid_bt, shared, layer)


def _per_layer_training(block_cls, cfg, x_btd, positions_bt, valid_bt, layer_kv) -> tuple:
  """The unscanned training stack: blocks layer_i, rematerialised by `cfg.remat`, each called
  with `layer_kv(i)`; returns the output and each block's returned kv."""
  block = block_cls
  if cfg.remat != "none":
    block = nn.remat(block_cls, policy=remat_policy(cfg.remat))
  kvs = []
  for layer in range(cfg.n_layers):
    x_btd, kv = block(layer_config(cfg, layer), name=f"layer_{layer}")(
        x_btd, positions_bt, valid_bt, layer_kv(layer)
    )
    x_btd = constrain(x_btd, RESIDUAL)
    kvs.append(kv)
  return x_btd, kvs


def _run_after_context(
    block_cls, cfg, x_btd, positions_bt, valid_bt, context: Context, window: int
):
  """Training rows after a read-only context (`ContextKV`): the layer stack, rematerialised."""
  windows = layer_windows(cfg, window)
  masks = {w: context_mask(context.positions_gs, positions_bt, w) for w in set(windows)}
  if cfg.scan_layers:
    _check_uniform(cfg, window)
    layer = _LayerContext(context.keys, context.values)
    x_btd, _ = _scan_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, masks[window], layer)
    return x_btd
  layer_kv = lambda i: ContextKV(context.keys[i], context.values[i], masks[windows[i]])
  return _per_layer_training(block_cls, cfg, x_btd, positions_bt, valid_bt, layer_kv)[0]


def run_blocks(
    block_cls,
    cfg,
    x_btd,
    positions_bt,
    valid_bt,
    cache: KVCache | Context | None,
    window: int = 0,
    keep_kv: int = 0,
):
  """The layer stack shared by every family: `cfg.n_layers` blocks, each called as
  `block(x, positions, valid, kv)` and rematerialised by `cfg.remat`'s policy; with
  `cfg.scan_layers` one block body under `nn.scan` over stacked parameters (`layers/...`: one
  compile of one layer, whatever the depth), else blocks named layer_i. With a cache (stacked
  per layer when scanned), masks come from its slots and its contexts, and the updated cache is
  returned; without one (training), tokens attend causally to themselves, no keys or values
  are kept and the returned cache is None, or with `keep_kv` > 0 it holds the first `keep_kv`
  tokens' keys and values (a filled cache of that many slots). With a `Context` (training rows
  continuing after it), they also attend to its keys and values, and nothing is returned for
  it. Call it from inside a compact method."""
  if isinstance(cache, Context):
    return _run_after_context(block_cls, cfg, x_btd, positions_bt, valid_bt, cache, window), None
  scan = cfg.scan_layers
  if scan:
    _check_uniform(cfg, window)
  if cache is None:
    if scan:
      x_btd, kept = _scan_blocks(block_cls, cfg, x_btd, positions_bt, valid_bt, None, None, keep_kv)
    else:
      x_btd, kvs = _per_layer_training(
          block_cls,
          cfg,
          x_btd,
          positions_bt,
          valid_bt,
          lambda _: KeptKV(keep_kv) if keep_kv else None,
      )
      kept = (tuple(kv.k_bksh for kv in kvs), tuple(kv.v_bksh for kv in kvs)) if keep_kv else None
    if not keep_kv:
      return x_btd, None
    return x_btd, KVCache(kept[0], kept[1], valid_bt[:, :keep_kv], jnp.asarray(keep_kv, jnp.int32))
  t = x_btd.shape[1]
  valid_bs = write_at(cache.valid_bs, valid_bt, cache.index, axis=1)
  windows = layer_windows(cfg, window)
  masks = {
      w: (
          attention_mask(valid_bs, cache.index, t, w),
          tuple(context_mask(c.positions_gs, positions_bt, w) for c in cache.context),
      )
      for w in set(windows)
  }
  mask_bts, context_masks = masks[window] if scan else (None, None)
  if scan:
    layer = _LayerCache(
        cache.keys,
        cache.values,
        tuple(c.keys for c in cache.context),
        tuple(c.values for c in cache.context),
    )
    x_btd, (keys, values) = _scan_blocks(
        block_cls, cfg, x_btd, positions_bt, valid_bt, (cache.index, mask_bts, context_masks), layer
    )
  else:
    keys, values = [], []
    for layer in range(cfg.n_layers):
      mask_bts, context_masks = masks[windows[layer]]
      kv = LayerKV(
          cache.keys[layer],
          cache.values[layer],
          cache.index,
          mask_bts,
          tuple(c.keys[layer] for c in cache.context),
          tuple(c.values[layer] for c in cache.context),
          context_masks,
      )
      x_btd, kv = block_cls(layer_config(cfg, layer), name=f"layer_{layer}")(
          x_btd, positions_bt, valid_bt, kv
      )
      keys.append(kv.k_bksh)
      values.append(kv.v_bksh)
    keys, values = tuple(keys), tuple(values)
  return x_btd, cache.replace(keys=keys, values=values, valid_bs=valid_bs, index=cache.index + t)


def is_stacked(params) -> bool:
  return LAYERS in params


def stack_layers(params: dict, n_layers: int, stack=None) -> dict:
  """A per-layer tree (`layer_i/...`) as a scanned model's (`layers/...`, leading layer axis),
  one parameter at a time: `stack(path, parts)` builds each stacked array (e.g. onto its
  devices), after which that parameter's per-layer arrays are dropped, so the peak is the model
  plus one stacked parameter. Consumes `params`' per-layer subtrees."""
  stack = stack or (
      lambda _, parts: np.stack(parts) if isinstance(parts[0], np.ndarray) else jnp.stack(parts)
  )
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  layers = [params[f"layer_{i}"] for i in range(n_layers)]
  stacked: dict = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(layers[0])[0]:
    keys = tuple(k.key for k in path)
    tree_set(stacked, keys, stack(keys, [tree_get(layer, keys) for layer in layers]))
    for layer in layers:
      tree_set(layer, keys, None)
  out[LAYERS] = stacked
  return out


def unstack_layers(params: dict) -> dict:
  """A scanned model's tree as the per-layer one (`layer_i/...`); other trees unchanged."""
  if not is_stacked(params):
    return params
  out = {k: v for k, v in params.items() if k != LAYERS}
  n_layers = jax.tree.leaves(params[LAYERS])[0].shape[0]
  for i in range(n_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params[LAYERS])
  return out
