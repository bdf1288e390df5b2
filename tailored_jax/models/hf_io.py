"""Hugging Face checkpoints (llama, mistral, qwen2, gptj) <-> our Flax params.

Import reads config.json and (sharded) safetensors tensor by tensor, so a model larger than host
memory streams onto the mesh one parameter at a time; export writes config.json and
model.safetensors that `transformers` loads.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import numpy as np

from tailored_jax.models.gptj import GPTJConfig
from tailored_jax.models.llama import LlamaConfig

SUPPORTED = ("llama", "mistral", "qwen2", "gptj")


class ModelImportError(ValueError):
  pass


def _gptj_config(hf: dict, source: str) -> GPTJConfig:
  if hf.get("activation_function", "gelu_new") != "gelu_new":
    raise ModelImportError(f"{source}: activation_function {hf['activation_function']!r} is not "
                           "supported (gelu_new)")
  try:
    return GPTJConfig(vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"],
                      n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                      rotary_dim=hf.get("rotary_dim") or hf["n_embd"] // hf["n_head"],
                      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
  except KeyError as e:
    raise ModelImportError(f"{source}: missing field {e}") from e


def config_from_hf(hf: dict, source: str = "config.json"
                   ) -> tuple[LlamaConfig | GPTJConfig, str]:
  """Our config and the HF model_type, from an HF config dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise ModelImportError(f"{source}: model_type {model_type!r} is not supported; "
                           f"supported: {', '.join(SUPPORTED)}")
  if model_type == "gptj":
    return _gptj_config(hf, source), model_type
  try:
    n_heads = hf["num_attention_heads"]
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "")) if scaling else ""
    if rope_type in ("default", None):
      rope_type = ""
    cfg = LlamaConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", scaling.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type != "mistral")),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        sliding_window=int(hf.get("sliding_window") or 0) if (
            model_type == "mistral" or hf.get("use_sliding_window")) else 0,
        rope_scaling=rope_type,
        rope_factor=float(scaling.get("factor", 1.0)),
        rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        rope_original_max_positions=int(scaling.get("original_max_position_embeddings", 8192)))
  except KeyError as e:
    raise ModelImportError(f"{source}: missing field {e}") from e
  if hf.get("hidden_act", "silu") != "silu":
    raise ModelImportError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
  return cfg, model_type


def hf_config(cfg, model_type: str, bos_id: int | None, eos_id: int | None) -> dict:
  if isinstance(cfg, GPTJConfig):
    return {"architectures": ["GPTJForCausalLM"], "model_type": "gptj",
            "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "rotary_dim": cfg.rotary_dim,
            "n_positions": 2048, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": False,
            "torch_dtype": "float32", "bos_token_id": bos_id, "eos_token_id": eos_id}
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}[model_type]
  out = {
      "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff, "hidden_act": "silu",
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": 32768,
      "torch_dtype": "float32", "bos_token_id": bos_id, "eos_token_id": eos_id,
  }
  if model_type == "llama":
    out["attention_bias"] = cfg.qkv_bias
    out["mlp_bias"] = False
  if cfg.sliding_window:
    out["sliding_window"] = cfg.sliding_window
    if model_type == "qwen2":
      out["use_sliding_window"] = True
  if cfg.rope_scaling == "llama3":
    out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                           "low_freq_factor": cfg.rope_low_freq_factor,
                           "high_freq_factor": cfg.rope_high_freq_factor,
                           "original_max_position_embeddings": cfg.rope_original_max_positions}
  return out


def _gptj_table(cfg: GPTJConfig) -> dict[str, tuple[tuple[str, ...], tuple, Callable, Callable]]:
  """HF name -> (our path, HF shape, HF->ours, ours->HF) for every GPT-J tensor."""
  d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  same = lambda w: w
  table = {
      "transformer.wte.weight": (("embedding",), (v, d), same, same),
      "transformer.ln_f.weight": (("final_norm", "scale"), (d,), same, same),
      "transformer.ln_f.bias": (("final_norm", "bias"), (d,), same, same),
      "lm_head.weight": (("lm_head",), (v, d), lambda w: w.T, lambda w: w.T),
      "lm_head.bias": (("lm_head_bias",), (v,), same, same),
  }
  for i in range(cfg.n_layers):
    p, l = f"transformer.h.{i}.", f"layer_{i}"
    table.update({
        p + "ln_1.weight": ((l, "ln", "scale"), (d,), same, same),
        p + "ln_1.bias": ((l, "ln", "bias"), (d,), same, same),
        p + "mlp.fc_in.weight": ((l, "w_in"), (f, d), lambda w: w.T, lambda w: w.T),
        p + "mlp.fc_in.bias": ((l, "b_in"), (f,), same, same),
        p + "mlp.fc_out.weight": ((l, "w_out"), (d, f), lambda w: w.T, lambda w: w.T),
        p + "mlp.fc_out.bias": ((l, "b_out"), (d,), same, same),
        p + "attn.out_proj.weight": ((l, "wo"), (d, d), lambda w: w.T.reshape(n, h, d),
                                     lambda w: w.reshape(n * h, d).T),
    })
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
      table[p + f"attn.{theirs}.weight"] = ((l, ours), (d, d), lambda w: w.T.reshape(d, n, h),
                                            lambda w: w.reshape(d, n * h).T)
  return table


def _expected_shapes(cfg) -> dict[str, tuple]:
  if isinstance(cfg, GPTJConfig):
    return {name: entry[1] for name, entry in _gptj_table(cfg).items()}
  d, n, k, h, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                      cfg.vocab_size)
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (v, d)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (n * h, d), p + "self_attn.k_proj.weight": (k * h, d),
        p + "self_attn.v_proj.weight": (k * h, d), p + "self_attn.o_proj.weight": (d, n * h),
        p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f)})
    if cfg.qkv_bias:
      shapes.update({p + "self_attn.q_proj.bias": (n * h,), p + "self_attn.k_proj.bias": (k * h,),
                     p + "self_attn.v_proj.bias": (k * h,)})
  return shapes


def _to_ours(name: str, w: np.ndarray, cfg) -> tuple[tuple[str, ...], np.ndarray]:
  """(path in our param tree, array in our layout) for one HF tensor."""
  if isinstance(cfg, GPTJConfig):
    path, _, convert, _ = _gptj_table(cfg)[name]
    return path, np.ascontiguousarray(convert(w))
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if name == "model.embed_tokens.weight":
    return ("embedding",), w
  if name == "model.norm.weight":
    return ("final_norm", "scale"), w
  if name == "lm_head.weight":
    return ("lm_head",), w.T
  _, _, i, rest = name.split(".", 3)
  layer = f"layer_{i}"
  table = {
      "input_layernorm.weight": (("attn_norm", "scale"), lambda: w),
      "post_attention_layernorm.weight": (("mlp_norm", "scale"), lambda: w),
      "self_attn.q_proj.weight": (("attn", "wq"), lambda: w.T.reshape(d, n, h)),
      "self_attn.k_proj.weight": (("attn", "wk"), lambda: w.T.reshape(d, k, h)),
      "self_attn.v_proj.weight": (("attn", "wv"), lambda: w.T.reshape(d, k, h)),
      "self_attn.o_proj.weight": (("attn", "wo"), lambda: w.T.reshape(n, h, d)),
      "self_attn.q_proj.bias": (("attn", "bq"), lambda: w.reshape(n, h)),
      "self_attn.k_proj.bias": (("attn", "bk"), lambda: w.reshape(k, h)),
      "self_attn.v_proj.bias": (("attn", "bv"), lambda: w.reshape(k, h)),
      "mlp.gate_proj.weight": (("mlp", "w_gate"), lambda: w.T),
      "mlp.up_proj.weight": (("mlp", "w_up"), lambda: w.T),
      "mlp.down_proj.weight": (("mlp", "w_down"), lambda: w.T),
  }
  path, convert = table[rest]
  return (layer, *path), np.ascontiguousarray(convert())


def to_hf(params, cfg) -> dict[str, np.ndarray]:
  """Our params (a nested dict of arrays) as HF tensors (float32 numpy)."""
  get = lambda *path: np.asarray(tree_get(params, path), np.float32)
  if isinstance(cfg, GPTJConfig):
    return {name: np.ascontiguousarray(back(get(*path)))
            for name, (path, _, _, back) in _gptj_table(cfg).items()}
  out = {"model.embed_tokens.weight": get("embedding"), "model.norm.weight": get("final_norm",
                                                                                 "scale")}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = get("lm_head").T
  for i in range(cfg.n_layers):
    p, l = f"model.layers.{i}.", f"layer_{i}"
    out[p + "input_layernorm.weight"] = get(l, "attn_norm", "scale")
    out[p + "post_attention_layernorm.weight"] = get(l, "mlp_norm", "scale")
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
      w = get(l, "attn", ours)
      out[p + f"self_attn.{theirs}.weight"] = w.reshape(cfg.d_model, -1).T
    out[p + "self_attn.o_proj.weight"] = get(l, "attn", "wo").reshape(-1, cfg.d_model).T
    if cfg.qkv_bias:
      for ours, theirs in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
        out[p + f"self_attn.{theirs}.bias"] = get(l, "attn", ours).reshape(-1)
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
      out[p + f"mlp.{theirs}.weight"] = get(l, "mlp", ours).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def tree_get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def safetensors_files(directory: str) -> list[str]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(directory, name) for name in files]
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise ModelImportError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def iter_hf_tensors(directory: str) -> Iterator[tuple[str, str, np.ndarray]]:
  """(file, name, float32 array) for every tensor, read one at a time."""
  from safetensors import safe_open
  for path in safetensors_files(directory):
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        yield path, name, np.asarray(f.get_tensor(name), np.float32)


def load_params(tensors: Iterator[tuple[str, str, np.ndarray]], cfg,
                place: Callable[[tuple[str, ...], np.ndarray], object] = lambda path, a: a) -> dict:
  """Our param tree from HF-named tensors; `place` puts each onto devices as it is converted.

  Unknown tensors, shape mismatches and missing tensors each raise naming the file and tensor.
  """
  expected = _expected_shapes(cfg)
  params: dict = {}
  seen = set()
  for source, name, array in tensors:
    if (name.endswith("rotary_emb.inv_freq") or name.endswith("attn.bias")
        or name.endswith("attn.masked_bias")
        or (getattr(cfg, "tie_embeddings", False) and name == "lm_head.weight")):
      continue
    if name not in expected:
      raise ModelImportError(f"{source}: unexpected tensor {name!r} for this architecture")
    if tuple(array.shape) != expected[name]:
      raise ModelImportError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, config "
                             f"says {expected[name]}")
    path, ours = _to_ours(name, array, cfg)
    _set(params, path, place(path, ours))
    seen.add(name)
  missing = sorted(set(expected) - seen)
  if missing:
    raise ModelImportError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  return params


def save_hf_dir(directory: str, params, cfg, model_type: str = "llama",
                bos_id: int | None = None, eos_id: int | None = None) -> None:
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  save_file(to_hf(params, cfg), os.path.join(directory, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config(cfg, model_type, bos_id, eos_id), f, indent=2)
