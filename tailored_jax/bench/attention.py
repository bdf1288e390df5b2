"""`python -m tailored_jax.bench.attention [--shapes=8x128,8x256,8x512] [--heads=8,8]`: the
training step's causal attention alone, ours (on CPU the native flash kernel, `ours`, and the
blockwise XLA form mapped over tiles of rows, `ours_xla`, as the train step runs them) against
torch's `scaled_dot_product_attention(is_causal=True)` on the same float32 queries, keys and
values, side by side in one process: forward, and forward plus backward of a weighted sum of the
output (median of `--repeats` after a warm-up), with the largest difference between each of ours
and torch's outputs and query gradients.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from tailored_jax.bench.common import median_seconds, report
from tailored_jax.bench.train_step import Shape
from tailored_jax.models.attention import blockwise, cpu_native, dispatch


def parse_heads(text: str) -> tuple[int, int]:
  """'QUERY,KV' heads, the first a multiple of the second."""
  try:
    heads, kv_heads = (int(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"--heads: {text!r} is not QUERY_HEADS,KV_HEADS (e.g. 9,3)") from None
  if not (0 < kv_heads <= heads and heads % kv_heads == 0):
    raise ValueError(f"--heads: {text!r}: query heads must be a positive multiple of kv heads")
  return heads, kv_heads


def inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
  """Queries [b, t, heads, h], keys and values [b, t, kv_heads, h], output weights like the
  queries; numpy float32."""
  rng = np.random.default_rng(seed)
  draw = lambda n: rng.standard_normal((batch, seq, n, head_dim), np.float32)
  return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


def ours(q, k, v, weights, repeats: int, kernel: str = "cpu_native", dtype=jnp.float32) -> dict:
  """Our training attention by `kernel` (a resolved `model.attention`) in `dtype`: forward and
  forward + backward milliseconds, the output and the three input gradients (numpy float32)."""
  valid = jnp.ones(q.shape[:2], bool)

  def attention(q, k, v):
    return dispatch.causal_attention(q, k, v, valid, dtype, 0, kernel)

  loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * weights)
  forward = jax.jit(attention)
  backward = jax.jit(jax.grad(loss, (0, 1, 2)))
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  weights = jnp.asarray(weights)
  _, fwd = median_seconds(lambda: jax.block_until_ready(forward(q, k, v)), repeats)
  _, both = median_seconds(lambda: jax.block_until_ready(backward(q, k, v)), repeats)
  as_numpy = lambda x: np.asarray(x.astype(jnp.float32))
  return {
      "forward_ms": fwd * 1e3,
      "forward_backward_ms": both * 1e3,
      "out": as_numpy(forward(q, k, v)),
      "grads": tuple(as_numpy(g) for g in backward(q, k, v)),
  }


def theirs(q, k, v, weights, repeats: int, device: str = "cpu", dtype: str = "float32") -> dict:
  """torch's `scaled_dot_product_attention(is_causal=True)` on `device` in `dtype`, as `ours`."""
  import torch

  as_torch = lambda x, kind: (
      torch.tensor(x).transpose(1, 2).contiguous().to(device, kind)  # [b, heads, t, h]
  )
  kind = getattr(torch, dtype)
  tq, tk, tv = (as_torch(x, kind).requires_grad_() for x in (q, k, v))
  tw = as_torch(weights, torch.float32)
  group = q.shape[2] // k.shape[2]
  synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None

  def attention():
    return torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, is_causal=True, enable_gqa=group > 1
    )

  def forward():
    with torch.no_grad():
      attention()
    synchronize()

  def backward():
    tq.grad = tk.grad = tv.grad = None
    (attention().float() * tw).sum().backward()
    synchronize()

  _, fwd = median_seconds(forward, repeats)
  _, both = median_seconds(backward, repeats)
  as_numpy = lambda x: x.transpose(1, 2).float().cpu().numpy()
  with torch.no_grad():
    out = as_numpy(attention())
  backward()
  return {
      "forward_ms": fwd * 1e3,
      "forward_backward_ms": both * 1e3,
      "out": out,
      "grads": tuple(as_numpy(x.grad) for x in (tq, tk, tv)),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
      "--shapes",
      default="8x128,8x256,8x512",
      help="BxT, comma-separated (a :P prefix is read and not used)",
  )
  parser.add_argument("--heads", default="8,8", help="query heads,key/value heads")
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  try:
    shapes = [Shape.parse(text) for text in args.shapes.split(",")]
    heads, kv_heads = parse_heads(args.heads)
  except ValueError as e:
    parser.error(str(e))
  import torch

  rows = {}
  for shape in shapes:
    batch, seq = shape.batch, shape.seq
    q, k, v, weights = inputs(batch, seq, heads, kv_heads, args.head_dim)
    results = {
        "ours": ours(q, k, v, weights, args.repeats),
        "ours_xla": ours(q, k, v, weights, args.repeats, "cpu_blockwise"),
        "torch": theirs(q, k, v, weights, args.repeats),
    }
    row = {
        side: {key: result[key] for key in ("forward_ms", "forward_backward_ms")}
        for side, result in results.items()
    }
    reference = results["torch"]
    for side in ("ours", "ours_xla"):
      mine = results[side]
      row[f"{side}_max_abs_output_difference"] = float(
          np.max(np.abs(mine["out"] - reference["out"]))
      )
      row[f"{side}_max_abs_query_gradient_difference"] = float(
          np.max(np.abs(mine["grads"][0] - reference["grads"][0]))
      )
      for key in ("forward_ms", "forward_backward_ms"):
        row[f"torch_over_{side}_{key[:-3]}"] = row["torch"][key] / row[side][key]
    rows[f"{batch}x{seq}"] = row
  report(
      "attention",
      heads=heads,
      kv_heads=kv_heads,
      head_dim=args.head_dim,
      dtype="float32",
      repeats=args.repeats,
      torch_threads=torch.get_num_threads(),
      torch_version=torch.__version__,
      native_kernel=cpu_native.available(),
      tile_bytes=blockwise.ATTENTION_TILE_BYTES,
      block=blockwise.ATTENTION_BLOCK,
      shapes=rows,
  )


if __name__ == "__main__":
  main()
