"""The student's forward, its KV cache, the decoder and the sharded train step, on tiny shapes."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tailored_jax import plan, sharding
from tailored_jax.data.batching import LMBatch, ReflectionBatch
from tailored_jax.models import layers
from tailored_jax.models.kv_cache import KVCache
from tailored_jax.models.llama import Llama, LlamaConfig
from tailored_jax.sample import decode, sampling
from tailored_jax.train.trainer import Trainer

CFG = LlamaConfig(
    vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
MODEL = Llama(CFG)


@pytest.fixture(scope="module")
def params():
  return nn.meta.unbox(layers.init_boxed_params(MODEL, jax.random.PRNGKey(0)))


def forward(params, tokens, positions, valid, cache=None):
  return MODEL.apply(
      {"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid), cache
  )


def test_incremental_decoding_matches_full_forward(params):
  tokens = np.array([[5, 9, 3, 7, 11, 2]], np.int32)
  positions = np.arange(6)[None]
  full, _, _ = forward(params, tokens, positions, np.ones_like(tokens, bool))
  cache = KVCache.zeros(CFG.n_layers, 1, 8, CFG.n_kv_heads, CFG.head_dim, jnp.float32)
  logits, _, cache = forward(params, tokens[:, :3], positions[:, :3], np.ones((1, 3), bool), cache)
  steps = [logits]
  for t in range(3, 6):
    logits, _, cache = forward(
        params, tokens[:, t : t + 1], positions[:, t : t + 1], np.ones((1, 1), bool), cache
    )
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_left_padding_is_masked(params):
  tokens = np.array([[5, 9, 3, 7]], np.int32)
  alone, _, _ = forward(params, tokens, np.arange(4)[None], np.ones((1, 4), bool))
  padded = np.array([[0, 0, 5, 9, 3, 7]], np.int32)
  valid = padded > 0
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
  got, _, _ = forward(params, padded, positions, valid)
  np.testing.assert_allclose(got[:, 2:], alone, atol=1e-5)


def test_prefix_cache_continuation_matches_full_hidden(params):
  """Self-reflection encodes continuations from a shared prefix cache: same hidden states."""
  prefix, cont = [4, 8, 15], [16, 23, 42 % 40]
  _, full_hidden, _ = forward(
      params, np.array([prefix + cont]), np.arange(6)[None], np.ones((1, 6), bool)
  )
  cache = KVCache.zeros(CFG.n_layers, 1, 3 + 4, CFG.n_kv_heads, CFG.head_dim, jnp.float32)
  _, _, cache = forward(
      params, np.array([prefix]), np.arange(3)[None], np.ones((1, 3), bool), cache
  )
  _, hidden, _ = forward(
      params,
      np.array([cont + [0]]),
      np.arange(3, 7)[None],
      np.array([[True, True, True, False]]),
      cache,
  )
  np.testing.assert_allclose(hidden[:, :3], full_hidden[:, 3:], atol=1e-5)


def _tables(eos=1):
  v = CFG.vocab_size
  never = np.zeros(v, bool)
  never[[0, 2]] = True
  special = never.copy()
  special[eos] = True
  starts, ends, blank = np.zeros(v, bool), np.zeros(v, bool), np.zeros(v, bool)
  starts[30] = ends[30] = True  # token 30 is "\n"; token 31 is "\n\n"
  blank[31] = True
  return decode.StopTables(starts, ends, blank, never, special, eos_id=eos, pad_id=0)


def _greedy(decoder, params, tokens, valid, max_new_tokens=6):
  """(tokens, lengths) of greedy decoding from left-padded `tokens`."""
  return decoder(
      params,
      tokens,
      valid,
      jax.random.PRNGKey(0),
      max_new_tokens=max_new_tokens,
      num_samples=1,
      sampling=sampling.SamplingConfig(),
  )


def test_greedy_decode_equals_stepwise_argmax(params):
  decoder = decode.Decoder(MODEL, _tables())
  prompt = [2, 7, 12, 5]
  tokens = np.array([[0, 0] + prompt, [2, 9, 4, 4, 6, 3]], np.int32)
  valid = tokens > 0
  out, lengths = _greedy(decoder, params, tokens, valid)
  seq = list(prompt)
  expected = []
  for _ in range(6):
    logits, _, _ = forward(
        params, np.array([seq]), np.arange(len(seq))[None], np.ones((1, len(seq)), bool)
    )
    row = np.array(logits[0, -1])
    row[[0, 2]] = -np.inf
    if not expected:
      row[1] = -np.inf
    nxt = int(np.argmax(row))
    expected.append(nxt)
    seq.append(nxt)
    if nxt in (1, 31):
      break
  n = int(lengths[0])
  assert out[0, :n].tolist() == expected[:n]
  assert n == len(expected)
  assert (np.asarray(out[0, n:]) == 0).all()


def test_rows_stop_on_their_own_and_samples_repeat_prompts(params):
  tables = _tables()
  decoder = decode.Decoder(MODEL, tables)
  tokens = np.array([[2, 7, 12, 5]], np.int32)
  out, lengths = decoder(
      params,
      tokens,
      tokens > 0,
      jax.random.PRNGKey(3),
      max_new_tokens=8,
      num_samples=5,
      sampling=sampling.SamplingConfig(1.0, 10, 0.9),
  )
  out, lengths = np.asarray(out), np.asarray(lengths)
  assert out.shape == (5, 8)
  for row, n in zip(out, lengths):
    stops = [
        i
        for i, t in enumerate(row[:n])
        if t == 1 or t == 31 or (i > 0 and row[i - 1] == 30 and t == 30)
    ]
    assert not stops or stops[0] == n - 1  # nothing after the first stop
    assert (row[n:] == 0).all()
    assert 0 not in row[:n] and 2 not in row[:n]


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, 2, 1.0))) & (
      np.asarray(sampling.filter_logits(logits, 2, 1.0)) > -1e29
  )
  assert kept.tolist() == [[True, True, False, False, False]]
  top_p = np.asarray(sampling.filter_logits(logits, 0, 0.8)) > -1e29
  assert top_p.tolist() == [[True, True, True, False, False]]


def _train_cfg():
  return ml_collections.ConfigDict(
      dict(
          lr=1e-2,
          warmup_steps=1,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.01,
          grad_clip=1.0,
          sr_weight=0.5,
          sr_margin=1.0,
          max_nonfinite_steps=3,
          loss_chunk_tokens=0,
      )
  )


def _batch(rng):
  b, t, p, c = 8, 12, 6, 5
  tokens = rng.integers(3, CFG.vocab_size, (b, t + 1)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[::3, 8:] = False
  prefix_mask = np.ones((b, p), bool)
  prefix_mask[1::2, :2] = False
  cont_mask = np.ones((b, 3, c), bool)
  cont_mask[:, 2, 3:] = False
  lm = LMBatch(
      tokens[:, :-1], tokens[:, 1:], mask, mask, np.where(mask, 1.0, 0.0).astype(np.float32)
  )
  reflection = ReflectionBatch(
      rng.integers(3, CFG.vocab_size, (b, p)).astype(np.int32),
      prefix_mask,
      rng.integers(3, CFG.vocab_size, (b, 3, c)).astype(np.int32),
      cont_mask,
      (np.arange(b) % 4 != 0).astype(np.float32),
  )
  return lm, reflection


def _mesh_cfg(data, fsdp, tensor, num_devices):
  return ml_collections.ConfigDict(
      {"mesh": dict(data=data, fsdp=fsdp, tensor=tensor, num_devices=num_devices)}
  )


def fixed_batch_losses(model, steps: int = 30) -> list[float]:
  """The LM loss over `steps` steps on one batch, from fresh weights on one device."""
  trainer = Trainer(model, _train_cfg(), sharding.make_mesh(_mesh_cfg(1, 1, 1, 1)))
  state = trainer.new_state(trainer.init_params(1))
  step_fn = trainer.step_fn()
  batch = trainer.put_batch(_batch(np.random.default_rng(1))[0])
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, batch, None)
    losses.append(float(metrics["loss"]))
  return losses


def test_lm_loss_decreases_on_a_fixed_batch():
  losses = fixed_batch_losses(MODEL)
  assert losses[-1] < 0.5 * losses[0]


def test_exam_samples_do_not_depend_on_batch_size_or_order(params):
  """Sample keys come from (prompt, sample): batch size and prompt order leave texts unchanged."""
  from tailored_jax.sample.runner import generate_texts

  class CharTokenizer:  # one token per letter a..z, ids 3..28; pad 0, bos 2, eos 1
    pad_id = 0

    def encode_batch(self, texts):
      return [[2] + [3 + ord(c) - ord("a") for c in t] for t in texts]

    def decode_batch(self, rows):
      return [",".join(str(int(t)) for t in row) for row in rows]

  mesh = sharding.make_mesh(
      ml_collections.ConfigDict({"mesh": dict(data=-1, fsdp=1, tensor=1, num_devices=1)})
  )
  decoder = decode.Decoder(MODEL, decode.StopTables.never_stop(CFG.vocab_size))
  prompts = ["abc", "hello", "xyz", "qq", "mnop"]

  def run(batch_size, order):
    texts = generate_texts(
        decoder,
        params,
        CharTokenizer(),
        [prompts[i] for i in order],
        mesh=mesh,
        num_samples=3,
        sampling=sampling.SamplingConfig(1.0, 10, 1.0),
        max_new_tokens=5,
        batch_size=batch_size,
        rng=jax.random.PRNGKey(7),
        label="test",
    )
    return {prompts[i]: t for i, t in zip(order, texts)}

  reference = run(2, [0, 1, 2, 3, 4])
  assert run(4, [4, 3, 2, 1, 0]) == reference
  assert run(5, [2, 0, 4, 1, 3]) == reference
  assert len({s for samples in reference.values() for s in samples}) > 5  # samples differ


@pytest.mark.parametrize("family", ["llama_tied", "llama_untied", "gptj"])
def test_chunked_lm_loss_equals_the_whole_sequence_loss(family):
  """Logits made 5 positions at a time (12 is not a multiple: the last chunk is padded) give the
  same loss and gradients as all positions at once."""
  from tailored_jax.models import model_for
  from tailored_jax.models.gptj import GPTJConfig
  from tailored_jax.train import step as step_lib

  cfg = {
      "llama_tied": CFG,
      "llama_untied": dataclasses.replace(CFG, tie_embeddings=False),
      "gptj": GPTJConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=64, rotary_dim=4),
  }[family]
  model = model_for(cfg)
  params = nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(1)))
  lm, _ = _batch(np.random.default_rng(2))
  lm = jax.tree.map(jnp.asarray, lm)
  whole = jax.value_and_grad(lambda p: step_lib.lm_forward_loss(model, p, lm)[0])(params)
  chunked = jax.value_and_grad(lambda p: step_lib.lm_forward_loss(model, p, lm, 5)[0])(params)
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(chunked[1]), jax.tree.leaves(whole[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


class _LetterTokenizer:  # one token per letter a..z and space, ids 3..29; pad 0, bos 2, eos 1
  pad_id = 0

  def encode_batch(self, texts):
    return [[2] + [3 + (26 if c == " " else ord(c) - ord("a")) for c in t] for t in texts]

  def decode_batch(self, rows):
    return [",".join(str(int(t)) for t in row) for row in rows]


@pytest.mark.parametrize(
    "window,mesh_shape", [(0, (1, 1, 1, 1)), (7, (1, 1, 1, 1)), (0, (2, 2, 2, 0))]
)
def test_shared_prefix_decoding_equals_whole_prompts(window, mesh_shape):
  """The demos every prompt starts with, prefilled once and shared, give the same greedy and
  sampled tokens as prefilling each whole prompt (GQA, left padding, a sliding window shorter
  than the prompts, an 8-device mesh with the weights in the model-parallel decode layout)."""
  from tailored_jax.sample.runner import generate_texts

  cfg = dataclasses.replace(CFG, sliding_window=window)
  model = Llama(cfg)
  params = nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(5)))
  mesh = sharding.make_mesh(_mesh_cfg(*mesh_shape))
  layout = "train"
  if mesh.size > 1:  # weights in the model-parallel decode layout, rows over data
    layout = "model_parallel"
    trainer = Trainer(model, _train_cfg(), mesh)
    params = jax.device_put(
        params,
        sharding.decode_shardings(trainer.param_specs, trainer.abstract_params, mesh, layout),
    )
  demos = "the quick brown fox jumps over the lazy dog "
  prompts = [demos + q for q in ("abc", "hello world", "xyz", "qq", "mnop", "sphinx of quartz")]
  for sampling_cfg, samples in (
      (sampling.SamplingConfig(), 1),
      (sampling.SamplingConfig(1.0, 10, 0.9), 3),
  ):
    texts = []
    for share in (False, True):
      decoder = decode.Decoder(model, decode.StopTables.never_stop(cfg.vocab_size))
      texts.append(
          generate_texts(
              decoder,
              params,
              _LetterTokenizer(),
              prompts,
              mesh=mesh,
              num_samples=samples,
              sampling=sampling_cfg,
              max_new_tokens=12,
              batch_size=4,
              rng=jax.random.PRNGKey(7),
              label="test",
              share_prefix=share,
              decode_layout=layout,
          )
      )
    assert texts[0] == texts[1]
  assert decoder.compilations == 2  # the prefix, and one for the only length bucket


def test_model_parallel_decoding_splits_rows_over_the_axes_no_weight_uses():
  """Heads, MLP width and vocabulary that no axis of a (1, 4, 2) mesh divides: the model-parallel
  layout keeps every weight whole, so every device decodes rows of its own (over data, fsdp and
  tensor; before, only over data: each device decoded every prompt), each takes its own rows'
  top-k, nothing but the loop's stop flag crosses devices, and the texts equal one device's."""
  from tailored_jax.sample.runner import generate_texts

  cfg = LlamaConfig(
      vocab_size=41, d_model=24, n_layers=2, n_heads=3, n_kv_heads=3, head_dim=8, d_ff=45
  )
  model = Llama(cfg)
  params = nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(3)))
  mesh = sharding.make_mesh(_mesh_cfg(1, 4, 2, 0))
  trainer = Trainer(model, _train_cfg(), mesh)
  placed = sharding.decode_shardings(
      trainer.param_specs, trainer.abstract_params, mesh, "model_parallel"
  )
  row_axes = sharding.decode_row_axes("model_parallel", placed)
  assert row_axes == ("data", "fsdp", "tensor")
  rows = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.decode_batch_sharding(mesh, len(shape), row_axes)
  )
  tokens = rows((8, 16), jnp.int32)
  assert tokens.sharding.shard_shape(tokens.shape) == (1, 16)
  generate = jax.jit(
      functools.partial(
          decode.generate,
          model=model,
          max_new_tokens=4,
          num_samples=2,
          sampling=sampling.SamplingConfig(1.0, 5, 1.0),
          rows=sharding.decode_batch_sharding(mesh, 2, row_axes),
      )
  )
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      trainer.abstract_params,
      placed,
  )
  compiled = generate.lower(
      abstract,
      tokens,
      rows((8, 16), bool),
      rows((8, 2, 2), jnp.uint32),
      jax.tree.map(jnp.asarray, decode.StopTables.never_stop(cfg.vocab_size)),
  ).compile()
  # nothing moves between devices but the loop's "every row done?" flag: no partial activations
  # reduced, no rows' logits gathered for the top-k
  assert _collectives(compiled.as_text()) == [("all-reduce", ())]
  prompts = ["abc", "hello world", "xyz", "qq", "mnop", "sphinx of quartz", "a", "zz"]
  texts = {}
  for name, where, weights in (
      ("one device", sharding.make_mesh(_mesh_cfg(1, 1, 1, 1)), params),
      ("mesh", mesh, jax.device_put(params, placed)),
  ):
    decoder = decode.Decoder(model, decode.StopTables.never_stop(cfg.vocab_size))
    texts[name] = generate_texts(
        decoder,
        weights,
        _LetterTokenizer(),
        prompts,
        mesh=where,
        num_samples=2,
        sampling=sampling.SamplingConfig(1.0, 10, 0.9),
        max_new_tokens=6,
        batch_size=8,
        rng=jax.random.PRNGKey(7),
        label="test",
        decode_layout="model_parallel",
    )
  assert texts["mesh"] == texts["one device"]


def test_shared_prefix_cache_gives_the_whole_prompts_logits(params):
  """Prefix prefilled once + each row's own left-padded tokens: the same next-token logits as the
  whole prompts."""
  prefix = np.array([2, 7, 12, 5, 9, 9, 4], np.int32)
  own = np.array([[0, 0, 11, 3], [6, 8, 10, 13]], np.int32)
  shared = decode.prefill_prefix(params, jnp.asarray(prefix), model=MODEL)
  cache = KVCache.zeros(CFG.n_layers, 2, 4, CFG.n_kv_heads, CFG.head_dim, jnp.float32, (shared,))
  valid = own > 0
  positions = len(prefix) + np.maximum(np.cumsum(valid, axis=1) - 1, 0)
  got, _, _ = forward(params, own, positions, valid, cache)
  for row in range(2):
    whole = np.concatenate([prefix, own[row][valid[row]]])[None]
    expected, _, _ = forward(
        params, whole, np.arange(whole.shape[1])[None], np.ones_like(whole, bool)
    )
    np.testing.assert_allclose(got[row, -1], expected[0, -1], atol=1e-5)


@pytest.mark.parametrize(
    "top_k,top_p,allowed", [(4, 1.0, 4), (0, 0.75, 3), (4, 0.75, 3), (50, 0.75, 3)]
)
def test_sampling_never_leaves_the_allowed_set_and_follows_the_distribution(top_k, top_p, allowed):
  """A crafted distribution (6 likely tokens, 994 rare ones): every draw is among the `allowed`
  best, and each one's frequency is within 5 binomial standard deviations of its renormalised
  probability."""
  probs = np.full(1000, 0.0, np.float64)
  probs[:6] = [0.4, 0.25, 0.15, 0.1, 0.05, 0.04]
  probs[6:] = 0.01 / 994
  rank_of = np.random.default_rng(0).permutation(1000)  # the likely tokens are not ids 0..5
  logits = np.log(probs[rank_of]).astype(np.float32)
  draws = 20000
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  tokens = np.asarray(
      jax.jit(
          lambda k: sampling.choose_tokens(
              jnp.broadcast_to(jnp.asarray(logits), (draws, 1000)),
              k,
              sampling.SamplingConfig(1.0, top_k, top_p),
          )
      )(keys)
  )
  ranks = rank_of[tokens]  # rank 0 is the most likely token
  assert ranks.max() < allowed
  expected = probs[:allowed] / probs[:allowed].sum()
  counts = np.bincount(ranks, minlength=allowed)
  bound = 5 * np.sqrt(draws * expected * (1 - expected))
  assert (np.abs(counts - draws * expected) < bound).all(), (counts, draws * expected)


def test_greedy_tokens_is_argmax_with_first_index_on_ties():
  logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0], [-2.0, -3.0, -1.0, -1.5]])
  assert sampling.greedy_tokens(logits).tolist() == [1, 0, 2]


def _collectives(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(kind, first result shape) of every collective in a compiled module's text."""
  ops = filter(None, map(plan.collective_op, hlo_text.splitlines()))
  return [(kind, results[0][1]) for kind, results in ops]


@pytest.mark.parametrize("layout", ["model_parallel", "replicated"])
def test_decoding_in_the_decode_layout_gathers_no_weight(layout):
  """On a (1, 4, 2) mesh, decoding in the decode layout compiles to no all-gather of anything
  embed-sized (no weight is gathered per token): model-parallel decoding all-reduces each
  block's attention and MLP outputs and the embedding lookup (2 x layers + 1 per forward, for
  the prefill and the loop) and gathers the logits once; the training layout compiles to more
  collectives than that."""
  cfg = LlamaConfig(
      vocab_size=72, d_model=48, n_layers=2, n_heads=16, n_kv_heads=8, head_dim=8, d_ff=96
  )
  model = Llama(cfg)
  mesh = sharding.make_mesh(_mesh_cfg(1, 4, 2, 0))
  trainer = Trainer(model, _train_cfg(), mesh)

  def collectives(param_shardings, batch_layout):
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        trainer.abstract_params,
        param_shardings,
    )
    row_axes = sharding.decode_row_axes(batch_layout, param_shardings)
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.decode_batch_sharding(mesh, len(shape), row_axes)
    )
    tables = jax.tree.map(jnp.asarray, decode.StopTables.never_stop(cfg.vocab_size))
    generate = jax.jit(
        functools.partial(
            decode.generate,
            model=model,
            max_new_tokens=4,
            num_samples=2,
            sampling=sampling.SamplingConfig(1.0, 5, 1.0),
        )
    )
    lowered = generate.lower(
        params, rows((8, 16), jnp.int32), rows((8, 16), bool), rows((8, 2, 2), jnp.uint32), tables
    )
    return _collectives(lowered.compile().as_text())

  decode_shardings = sharding.decode_shardings(
      trainer.param_specs, trainer.abstract_params, mesh, layout
  )
  found = collectives(decode_shardings, layout)
  assert not [shape for kind, shape in found if kind == "all-gather" and cfg.d_model in shape]
  if layout == "replicated":  # rows split over data and fsdp; nothing model-sized moves
    assert not [shape for _, shape in found if cfg.d_model in shape]
    assert decode_shardings["layer_0"]["attn"]["wq"].spec == jax.sharding.PartitionSpec(
        None, None, None
    )
    return
  assert decode_shardings["layer_0"]["attn"]["wq"].spec == jax.sharding.PartitionSpec(
      None, ("tensor", "fsdp"), None
  )
  per_forward = 2 * cfg.n_layers + 1
  assert sorted(found) == sorted(
      [("all-gather", (16, cfg.vocab_size))]
      + [("all-reduce", (16, 1, cfg.d_model))] * per_forward
      + [("all-reduce", (8, 16, cfg.d_model))] * per_forward
  )
  assert len(collectives(trainer.param_shardings, "train")) > len(found)


def test_decode_memory_and_the_batch_that_fits():
  from tailored_jax.sample import memory

  need = memory.decode_memory(
      CFG, prompt_slots=32, max_new_tokens=16, num_samples=2, shared_prefix=10
  )
  # 48 own slots: 2 (k, v) x 2 layers x 48 x 2 kv heads x 8 x 4 bytes, for 2 rows
  assert need.kv_cache == 2 * 2 * 48 * 2 * 8 * 4 * 2
  # per token: logits x3 + scores over 58 slots x2 (4 heads) + activations, for 2 rows
  assert need.step == (4 * 40 * 3 + 4 * 4 * 58 * 2 + 4 * (64 * 3 + 32 * 4)) * 2
  assert need.prefill == 4 * 4 * 32 * 42 * 2 + 4 * 32 * (64 * 3 + 32 * 4)
  assert need.total == need.kv_cache + need.prefill
  assert memory.fit_batch(64, need.total, 10 * need.total, 2) == 20
  assert memory.fit_batch(16, need.total, 10 * need.total, 2) == 16
  assert memory.fit_batch(64, need.total, 1, 4) == 4  # never below one row per shard
  split = need.with_heads_split(2)  # a device holding one of the 2 kv heads
  assert split.kv_cache == need.kv_cache // 2 and split.step == need.step
  assert split.total == need.kv_cache // 2 + need.prefill


def test_a_small_memory_budget_shrinks_the_batch_not_the_results(params, caplog):
  from tailored_jax.sample.runner import generate_texts

  mesh = sharding.make_mesh(_mesh_cfg(-1, 1, 1, 1))
  decoder = decode.Decoder(MODEL, decode.StopTables.never_stop(CFG.vocab_size))
  prompts = ["abc", "hello", "xyz", "qq", "mnop", "sphinx"]
  run = lambda budget: generate_texts(
      decoder,
      params,
      _LetterTokenizer(),
      prompts,
      mesh=mesh,
      num_samples=2,
      sampling=sampling.SamplingConfig(1.0, 10, 1.0),
      max_new_tokens=5,
      batch_size=8,
      rng=jax.random.PRNGKey(1),
      label="exam",
      memory_budget_bytes=budget,
  )
  with caplog.at_level("INFO"):
    roomy, tight = run(2**30), run(100_000)
  assert roomy == tight
  batches = [r.getMessage() for r in caplog.records if "per batch" in r.getMessage()]
  assert batches[0].startswith("exam: 6 prompts x 2 samples per batch (asked 8)")
  assert batches[1].startswith("exam: 1 prompts x 2 samples per batch (asked 8)")


def test_continuation_logprobs_equal_the_whole_strings(params):
  """log p(continuation | prefix) through the shared-prefix path equals the same sum read off one
  forward over prefix ⊕ continuation (left-padded prefixes, right-padded continuations)."""
  from tailored_jax.train import step as step_lib

  rng = np.random.default_rng(3)
  _, reflection = _batch(rng)
  got = np.asarray(step_lib.continuation_logprobs(MODEL, params, reflection, (0, 2)))
  for row in range(reflection.prefix.shape[0]):
    prefix = reflection.prefix[row][reflection.prefix_mask[row]]
    for j, which in enumerate((0, 2)):
      cont = reflection.continuations[row, which][reflection.continuation_mask[row, which]]
      whole = np.concatenate([prefix, cont])[None]
      logits, _, _ = forward(
          params, whole, np.arange(whole.shape[1])[None], np.ones_like(whole, bool)
      )
      logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
      expected = sum(float(logp[len(prefix) - 1 + i, t]) for i, t in enumerate(cont))
      np.testing.assert_allclose(got[row, j], expected, rtol=1e-4)


def test_dpo_step_starts_at_log_two_and_learns():
  """With the round's starting weights as the reference, DPO's first loss is exactly log 2 on
  every row; a few steps on the same batch push the chosen rationale above the wrong one."""
  import math

  mesh = sharding.make_mesh(_mesh_cfg(1, 1, 1, 1))
  trainer = Trainer(MODEL, _train_cfg(), mesh, reflection_loss="dpo")
  params = trainer.init_params(2)
  reference = jax.tree.map(jnp.copy, params)
  state = trainer.new_state(params)
  step_fn = trainer.step_fn()
  lm, reflection = _batch(np.random.default_rng(4))
  lm, reflection = trainer.put_batch(lm), trainer.put_batch(reflection)
  sr = []
  for _ in range(8):
    state, metrics = step_fn(state, lm, reflection, reference)
    sr.append(float(metrics["sr_loss"]))
  assert sr[0] == pytest.approx(math.log(2.0), rel=1e-6)
  assert sr[-1] < 0.9 * sr[0]


def test_model_flops_and_mfu_by_the_devices_the_step_runs_on(monkeypatch):
  from tailored_jax.train import throughput

  class H100:
    device_kind = "NVIDIA H100 80GB HBM3"
    platform = "gpu"

  class CPU:
    device_kind = "cpu"
    platform = "cpu"

  class OtherGPU:
    device_kind = "some GPU"
    platform = "gpu"

  # 6 x 1e9 params x 100k tokens/s / 2 devices = 300 TFLOP/s each, 30.3% of 989
  flops = throughput.model_flops(10**9, 1e5, [H100()] * 2)
  assert flops.text() == "300 model TFLOP/s per device, MFU 30.3% of bf16 peak"
  assert abs(flops.mfu - 300 / 989) < 1e-12
  # a CPU has no data-sheet peak: its measured matmul peak in the compute dtype instead
  measured = throughput.measured_matmul_tflops("float32")
  assert 0.001 < measured < 100 and throughput.measured_matmul_tflops("float32") == measured
  monkeypatch.setattr(throughput, "measured_matmul_tflops", lambda dtype: {"float32": 0.5}[dtype])
  assert throughput.model_flops(10**6, 1e3, [CPU()]).text() == (
      "0.006 model TFLOP/s per device, MFU 1.2% of the measured float32 matmul peak"
  )
  flops = throughput.model_flops(10**6, 1e3, [OtherGPU()])
  assert flops.text() == "0.006 model TFLOP/s per device" and flops.mfu is None


@pytest.mark.parametrize("groups", [4, 1])
def test_a_decode_step_reads_only_the_filled_slots_and_equals_the_whole_buffer(groups):
  """`attend_span` (a one-token step over its rows' own buffer, read in chunks up to the
  slots filled so far; a prompt buffer's from the first slot a row sees) equals one softmax over
  the whole buffer, and reads no chunk outside the span: those hold NaN here. Also the forms of
  `attend_part` for rows sharing keys (groups = 1) and rows owning theirs (groups = rows)."""
  from tailored_jax.models.attention import cached

  rows, kv_heads, x, h, slots, filled = 4, 2, 3, 8, 4 * cached.FILLED_CHUNK, 45
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  q = jax.random.normal(keys[0], (rows, kv_heads, x, h))
  k = jax.random.normal(keys[1], (groups, kv_heads, slots, h))
  v = jax.random.normal(keys[2], (groups, kv_heads, slots, h))
  mask = np.zeros((rows, x, slots), bool)
  mask[:, :, :filled] = True
  mask[1, :, :7] = False  # a left-padded row
  expected = cached.attend_part(q, k, v, jnp.asarray(mask), jnp.float32, 0.3)
  reference = np.einsum(
      "bkxs,bksh->bkxh",
      np.where(
          mask[:, None],
          np.exp(
              np.einsum("bkxh,bksh->bkxs", q, np.repeat(k, rows // groups, 0)) * 0.3
              - np.asarray(expected.max_bkx)[..., None]
          ),
          0.0,
      ),
      np.repeat(v, rows // groups, 0),
  )
  np.testing.assert_allclose(np.asarray(expected.out_bkxh), reference, rtol=1e-5, atol=1e-5)
  if groups == 1:
    return
  unread = -(-filled // cached.FILLED_CHUNK) * cached.FILLED_CHUNK
  poisoned = lambda a: a.at[:, :, unread:].set(jnp.nan)
  span = jax.jit(
      lambda q, k, v, mask, lo, hi: cached.attend_span(q, k, v, mask, lo, hi, jnp.float32, 0.3)
  )
  got = span(q, poisoned(k), poisoned(v), jnp.asarray(mask), 0, filled)
  normalised = lambda p: np.asarray(p.out_bkxh / p.sum_bkx[..., None])
  np.testing.assert_allclose(normalised(got), normalised(expected), rtol=1e-5, atol=1e-6)
  late = np.zeros_like(mask)  # right-aligned prompts, the longest starting in the second chunk
  late[:, :, 40:] = True
  late[2, :, :50] = False
  first = int(cached.first_seen(jnp.asarray(late)))
  assert first == 40
  expected = cached.attend_part(q, k, v, jnp.asarray(late), jnp.float32, 0.3)
  skipped = lambda a: a.at[:, :, : cached.FILLED_CHUNK].set(jnp.nan)
  got = span(q, skipped(k), skipped(v), jnp.asarray(late), first, slots)
  np.testing.assert_allclose(normalised(got), normalised(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gptj", "gpt2"])
def test_decode_weights_in_the_compute_dtype_give_the_same_logits_and_tokens(family):
  """A bfloat16 model with float32 master weights decodes from `decode_weights`: matrices cast
  once to bfloat16 (GPT-2's embeddings, summed in float32, kept), vectors kept; the prefill's
  logits are bit-identical to decoding from the float32 weights, and so are greedy tokens."""
  from tailored_jax.models import decode_weights, model_for
  from tailored_jax.models.gpt2 import GPT2Config
  from tailored_jax.models.gptj import GPTJConfig
  from tailored_jax.sample import prefill

  bf16 = dict(dtype="bfloat16", param_dtype="float32")
  cfg = {
      "llama": dataclasses.replace(CFG, **bf16),
      "gptj": GPTJConfig(
          vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=64, rotary_dim=4, **bf16
      ),
      "gpt2": GPT2Config(
          vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_positions=64, **bf16
      ),
  }[family]
  model = model_for(cfg)
  master = nn.meta.unbox(layers.init_boxed_params(model, jax.random.PRNGKey(4)))
  cast = decode_weights(master, cfg)
  kept = {"gpt2": {"embedding", "positions"}}.get(family, set())
  for path, leaf in jax.tree_util.tree_leaves_with_path(cast):
    matrix = leaf.ndim >= 2 and path[-1].key not in kept
    assert leaf.dtype == (jnp.bfloat16 if matrix else jnp.float32), (path, leaf.dtype)
  assert any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(cast))
  tokens = np.array([[0, 0, 2, 7, 12, 5], [2, 9, 4, 4, 6, 3]], np.int32)
  valid = tokens > 0
  logits, _, _ = prefill.prefill_prompts(master, tokens, valid, None, model=model)
  logits_cast, _, _ = prefill.prefill_prompts(cast, tokens, valid, None, model=model)
  np.testing.assert_array_equal(logits_cast, logits)
  decoder = decode.Decoder(model, _tables())
  np.testing.assert_array_equal(
      _greedy(decoder, cast, tokens, valid)[0], _greedy(decoder, master, tokens, valid)[0]
  )
