"""generate: the log-prob contract with the training path, greedy == uncached argmax, EOS, filters."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.logprobs import model_apply_fn, token_logps
from postrl.models import Transformer
from postrl.sampling import generate, pad_prompts, process_logits, sample_token
from postrl.sampling.generate import default_bits_per_pass
from tests.conftest import tiny_config

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def model():
  return Transformer(tiny_config(), rngs=nnx.Rngs(0))


def _full_sequences(prompts, out):
  rows = []
  for b, p in enumerate(prompts):
    n = int(out.lengths_B[b])
    rows.append(list(p) + np.asarray(out.tokens_BxN[b, :n]).tolist())
  return rows


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
                                      dict(temperature=1.3, top_k=5, min_p=0.05)])
def test_model_logps_equal_training_path(model, settings):
  tokens, lengths = pad_prompts(PROMPTS)
  out = generate(model, tokens, lengths, key=jax.random.key(0), max_new_tokens=12, eos_ids=(),
                 **settings)
  full = _full_sequences(PROMPTS, out)
  ft, _ = pad_prompts(full)
  graphdef, params = nnx.split(model)
  recomputed = token_logps(model_apply_fn(graphdef), params, jnp.asarray(ft))
  for b, p in enumerate(PROMPTS):
    n = int(out.lengths_B[b])
    np.testing.assert_allclose(out.model_logps_BxN[b, :n], recomputed[b, len(p):len(p) + n],
                               rtol=1e-5, atol=1e-5)
  # The sampling log-probs are those of the processed distribution, so they differ from the
  # plain ones whenever truncation or temperature is on, and never exceed 0.
  assert np.all(np.asarray(out.logps_BxN) <= 1e-6)


def test_sampling_logps_are_processed_distribution(model):
  tokens, lengths = pad_prompts(PROMPTS)
  settings = dict(temperature=0.7, top_k=7)
  out = generate(model, tokens, lengths, key=jax.random.key(3), max_new_tokens=6, eos_ids=(),
                 **settings)
  full = _full_sequences(PROMPTS, out)
  for b, seq in enumerate(full):
    logits = model(jnp.asarray([seq]))[0]
    p = len(PROMPTS[b])
    z = process_logits(logits[p - 1:len(seq) - 1], **settings)
    expected = jnp.take_along_axis(jax.nn.log_softmax(z), jnp.asarray(seq[p:])[:, None], -1)[:, 0]
    np.testing.assert_allclose(out.logps_BxN[b], expected, rtol=1e-5, atol=1e-5)


def test_greedy_equals_uncached_argmax(model):
  tokens, lengths = pad_prompts(PROMPTS, multiple=16)  # extra padding must not matter
  out = generate(model, tokens, lengths, max_new_tokens=10, temperature=0.0, eos_ids=())
  forward = jax.jit(model.__call__)
  for b, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for _ in range(10):
      seq.append(int(jnp.argmax(forward(jnp.asarray([seq]))[0, -1])))
    np.testing.assert_array_equal(out.tokens_BxN[b], seq[len(prompt):])
  np.testing.assert_array_equal(out.logps_BxN, 0.0)  # a point mass


def test_eos_stops_each_row(model):
  tokens, lengths = pad_prompts(PROMPTS)
  free = generate(model, tokens, lengths, max_new_tokens=10, temperature=0.0, eos_ids=())
  eos = int(free.tokens_BxN[0, 3])  # row 0 emits this token at step 3 (or earlier)
  out = generate(model, tokens, lengths, max_new_tokens=10, temperature=0.0, eos_ids=(eos,),
                 pad_id=0)
  for b in range(3):
    row = np.asarray(free.tokens_BxN[b]).tolist()
    n = row.index(eos) + 1 if eos in row else 10
    assert int(out.lengths_B[b]) == n
    assert bool(out.finished_B[b]) == (eos in row)
    np.testing.assert_array_equal(out.tokens_BxN[b, :n], row[:n])
    np.testing.assert_array_equal(out.tokens_BxN[b, n:], 0)
    np.testing.assert_array_equal(out.model_logps_BxN[b, n:], 0.0)


def test_process_logits_golden():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda z: np.isfinite(np.asarray(z))[0].tolist()  # noqa: E731
  assert kept(process_logits(logits, top_k=2)) == [True, True, False, False, False]
  # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token (0.15) is needed too.
  assert kept(process_logits(logits, top_p=0.8)) == [True, True, True, False, False]
  assert kept(process_logits(logits, top_p=0.7)) == [True, True, False, False, False]
  assert kept(process_logits(logits, top_p=0.01)) == [True, False, False, False, False]
  # min-p 0.3: keep p >= 0.3 * 0.5 = 0.15.
  assert kept(process_logits(logits, min_p=0.3)) == [True, True, True, False, False]
  np.testing.assert_allclose(process_logits(logits, temperature=0.5), logits / 0.5, rtol=1e-6)


def test_sample_token_frequencies_follow_processed_distribution():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 20000)
  sample = jax.vmap(lambda k: sample_token(k, logits, temperature=1.0, top_k=None, top_p=0.8,
                                           min_p=None)[0][0])
  freq = np.bincount(np.asarray(sample(keys)), minlength=5) / 20000
  np.testing.assert_allclose(freq, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)


def test_bad_arguments(model):
  tokens, lengths = pad_prompts(PROMPTS)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    generate(model, tokens, lengths, temperature=1.0)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, tokens, lengths, key=jax.random.key(0), top_p=1.5)
  with pytest.raises(ValueError, match="finite number >= 0, got nan"):
    generate(model, tokens, lengths, key=jax.random.key(0), temperature=float("nan"))
  with pytest.raises(ValueError, match="prompt lengths"):
    generate(model, tokens, np.array([0, 2, 3]), temperature=0.0)
  with pytest.raises(ValueError, match="at least one token"):
    pad_prompts([[1], []])


def test_generating_past_the_trained_context_warns():
  short = Transformer(tiny_config(max_position_embeddings=12), rngs=nnx.Rngs(0))
  tokens, lengths = pad_prompts(PROMPTS)  # the longest prompt has 8 tokens
  with pytest.warns(UserWarning, match="needs 13 positions, more than the model's "
                                       "max_position_embeddings=12"):
    generate(short, tokens, lengths, temperature=0.0, max_new_tokens=5)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # exactly at the limit: no warning
    generate(short, tokens, lengths, temperature=0.0, max_new_tokens=4)


def _sorted_reference(z, top_k=None, top_p=None):
  """The textbook definitions by full sort, to check the bisection thresholds against."""
  z = np.asarray(z, np.float64)
  keep = np.ones_like(z, bool)
  for b in range(z.shape[0]):
    order = np.argsort(-z[b], kind="stable")
    if top_k is not None:
      keep[b] &= z[b] >= z[b, order[top_k - 1]]
    if top_p is not None:
      p = np.exp(z[b] - z[b].max())
      p /= p.sum()
      before = np.cumsum(p[order]) - p[order]
      n_keep = max(int(np.sum(before < top_p)), 1)
      keep[b] &= p >= p[order[n_keep - 1]]
  return keep


@pytest.mark.parametrize("bits_per_pass", [1, 4])
@pytest.mark.parametrize("top_k, top_p", [(1, None), (7, None), (50, None), (None, 0.5),
                                          (None, 0.9), (None, 0.999)])
def test_thresholds_equal_sort_based_definition(top_k, top_p, bits_per_pass):
  rng = np.random.RandomState(0)
  z = rng.randn(6, 300).astype(np.float32) * 3
  z[0, :40] = 1.5  # ties, also at the boundary
  z[1] = np.round(z[1])
  z[2, 100:] = -np.inf  # removed tokens (an earlier filter)
  kept = np.isfinite(np.asarray(process_logits(jnp.asarray(z), top_k=top_k, top_p=top_p,
                                               bits_per_pass=bits_per_pass)))
  np.testing.assert_array_equal(kept, _sorted_reference(z, top_k, top_p))


def test_radix_threshold_search_equals_bisection_bit_for_bit():
  """Every bits_per_pass finds the same smallest key (2, 4, 8 and 16 bits a pass), on keys that
  span the whole uint32 range, including 0 and 2^32 - 1, with counts and masses."""
  from postrl.sampling.generate import _smallest_key_below  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(1)
  keys = rng.randint(0, 2**32, (5, 64), dtype=np.uint64).astype(np.uint32)
  keys[0, :3] = [0, 2**32 - 1, 2**31]
  keys[1] = 7  # all equal
  mass = rng.dirichlet(np.ones(64), size=5).astype(np.float32)
  keys, mass = jnp.asarray(keys), jnp.asarray(mass)
  for count_fn, limit in ((lambda above: jnp.sum(above, axis=-1), 5),
                          (lambda above: jnp.sum(above, axis=-1), 1),
                          (lambda above: jnp.sum(jnp.where(above, mass[:, None, :], 0.0), -1), 0.7)):
    want = np.asarray(_smallest_key_below(keys, count_fn, limit))
    for bits in (2, 4, 8, 16):
      np.testing.assert_array_equal(_smallest_key_below(keys, count_fn, limit,
                                                        bits_per_pass=bits), want)
    # the defining property: count(keys > b) < limit at b, >= limit at b - 1 (when b > 0)
    def above(b_B, count_fn=count_fn):
      return np.asarray(count_fn(keys[:, None, :] > jnp.asarray(b_B)[:, None, None]))[:, 0]
    assert (above(want) < limit).all()
    positive = want > 0
    assert (above(np.where(positive, want - 1, 0))[positive] >= limit).all()
  with pytest.raises(ValueError, match="bits_per_pass must divide 32"):
    _smallest_key_below(keys, count_fn, 0.5, bits_per_pass=3)


def test_fixed_trip_count_loop_equals_early_exit_loop(model):
  # eos_ids=() decodes with a fixed-trip-count loop; an EOS id that is never sampled takes the
  # while_loop with its data-dependent exit: same key, so the same tokens and log-probs.
  tokens, lengths = pad_prompts(PROMPTS)
  kw = dict(key=jax.random.key(5), max_new_tokens=7, temperature=1.0, top_p=0.95)
  fixed = generate(model, tokens, lengths, eos_ids=(), **kw)
  unused = int(next(t for t in range(model.config.vocab_size)
                    if t not in set(np.asarray(fixed.tokens_BxN).ravel().tolist())))
  early = generate(model, tokens, lengths, eos_ids=(unused,), **kw)
  np.testing.assert_array_equal(fixed.tokens_BxN, early.tokens_BxN)
  np.testing.assert_array_equal(fixed.lengths_B, [7, 7, 7])
  np.testing.assert_allclose(fixed.logps_BxN, early.logps_BxN, rtol=1e-6)
  np.testing.assert_allclose(fixed.model_logps_BxN, early.model_logps_BxN, rtol=1e-6)


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_p=0.9),
                                      dict(temperature=1.3, min_p=0.05)])
def test_pallas_sampling_kernel_keeps_the_log_prob_contract(model, settings):
  # the sort-free kernel (interpret mode on CPU) inside generate: tokens are in the kept set,
  # model log-probs equal the training path's; the sampling log-prob is exact for min-p and NaN
  # (not computed) under top-p
  tokens, lengths = pad_prompts(PROMPTS)
  out = generate(model, tokens, lengths, key=jax.random.key(0), max_new_tokens=5, eos_ids=(),
                 sampling_impl="pallas", interpret=True, **settings)
  full = _full_sequences(PROMPTS, out)
  ft, _ = pad_prompts(full)
  graphdef, params = nnx.split(model)
  recomputed = token_logps(model_apply_fn(graphdef), params, jnp.asarray(ft))
  for b, (p, seq) in enumerate(zip(PROMPTS, full)):
    n = int(out.lengths_B[b])
    np.testing.assert_allclose(out.model_logps_BxN[b, :n], recomputed[b, len(p):len(p) + n],
                               rtol=1e-5, atol=1e-5)
    logits = model(jnp.asarray([seq]))[0][len(p) - 1:len(seq) - 1]
    z = process_logits(logits, **settings)
    new = jnp.asarray(seq[len(p):])
    assert np.all(np.isfinite(np.take_along_axis(np.asarray(z), np.asarray(new)[:, None], -1)))
    if "top_p" in settings:
      assert np.all(np.isnan(np.asarray(out.logps_BxN[b, :n])))
    else:
      want = jnp.take_along_axis(jax.nn.log_softmax(z), new[:, None], -1)[:, 0]
      np.testing.assert_allclose(out.logps_BxN[b, :n], want, rtol=1e-5, atol=1e-5)


def test_sampling_impl_auto_is_xla_on_cpu_and_bad_impl_is_refused(model):
  """"auto" (the default) is XLA on a CPU: the same tokens and sampling log-probs as "xla"."""
  tokens, lengths = pad_prompts(PROMPTS)
  kw = dict(key=jax.random.key(1), max_new_tokens=4, eos_ids=(), temperature=1.0, top_p=0.9)
  auto = generate(model, tokens, lengths, **kw)
  xla = generate(model, tokens, lengths, sampling_impl="xla", **kw)
  np.testing.assert_array_equal(auto.tokens_BxN, xla.tokens_BxN)
  np.testing.assert_array_equal(auto.logps_BxN, xla.logps_BxN)
  with pytest.raises(ValueError, match="sampling_impl"):
    generate(model, tokens, lengths, sampling_impl="triton", **kw)


def test_pallas_sampling_refuses_parameters_on_several_devices(model):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  tokens, lengths = pad_prompts(PROMPTS)
  with pytest.raises(ValueError, match="one device; the parameters span 2"):
    generate((graphdef, params), tokens, lengths, key=jax.random.key(0), max_new_tokens=2,
             top_p=0.9, sampling_impl="pallas", interpret=True)


def test_rows_split_over_the_mesh_give_the_one_device_tokens(model):
  """Parameters on a (data 2, fsdp 2, tensor 2) mesh: the 8 rows are decoded 2 per batch shard
  (outputs split over data x fsdp), with the same tokens and log-probs as on one device; 6 rows
  (not a multiple of 4) and split_rows=False keep every row everywhere."""
  from postrl import sharding as shd  # pylint: disable=import-outside-toplevel
  from postrl.sampling.generate import row_sharding  # pylint: disable=import-outside-toplevel
  mesh = shd.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  graphdef, params = nnx.split(model)
  sharded = jax.device_put(params, shd.state_shardings(params, mesh))
  tokens, lengths = pad_prompts((PROMPTS * 3)[:8])
  kw = dict(key=jax.random.key(3), max_new_tokens=6, eos_ids=(2,), temperature=1.0, top_p=0.9)
  one = generate((graphdef, params), tokens, lengths, **kw)
  split = generate((graphdef, sharded), tokens, lengths, **kw)
  assert row_sharding(sharded, 8).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert split.tokens_BxN.sharding.spec[0] == ("data", "fsdp")
  assert {s.data.shape[0] for s in split.tokens_BxN.addressable_shards} == {2}
  np.testing.assert_array_equal(split.tokens_BxN, one.tokens_BxN)
  np.testing.assert_array_equal(split.lengths_B, one.lengths_B)
  np.testing.assert_allclose(split.model_logps_BxN, one.model_logps_BxN, rtol=1e-5, atol=1e-5)
  assert row_sharding(sharded, 6) is None and row_sharding(params, 8) is None
  kept = generate((graphdef, sharded), tokens, lengths, split_rows=False, gather_weights=False,
                  **kw)
  assert {s.data.shape[0] for s in kept.tokens_BxN.addressable_shards} == {8}
  np.testing.assert_array_equal(kept.tokens_BxN, one.tokens_BxN)


def test_decoding_gathers_fsdp_weights_once_not_every_step(model):
  """fsdp-sharded weights are gathered before the decode loop (tensor splits kept) and the cache
  is split like the rows and the k / v heads: the compiled decode step then all-gathers nothing,
  where the training shardings all-gather every layer's weights at every step."""
  import importlib  # pylint: disable=import-outside-toplevel
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  from postrl import sharding as shd  # pylint: disable=import-outside-toplevel
  gen = importlib.import_module("postrl.sampling.generate")
  mesh = shd.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  graphdef, params = nnx.split(model)
  sharded = jax.device_put(params, shd.state_shardings(params, mesh))
  gathered = shd.gather_over_batch_axes(sharded)
  assert shd.split_over_batch_axes(sharded) and not shd.split_over_batch_axes(gathered)
  q = gathered["layers"][0]["self_attn"]["q_proj"]["kernel"].value.sharding.spec
  assert q == jax.sharding.PartitionSpec(None, "tensor")  # ("embed", "q_heads"): fsdp dropped
  rows = gen.row_sharding(sharded, 8)
  tokens, lengths = jax.device_put(pad_prompts((PROMPTS * 3)[:8]), rows)

  def step_ops(params):
    compiled = gen._generate.lower(  # pylint: disable=protected-access
        graphdef, params, tokens, lengths, jax.random.key(0), max_new_tokens=3, temperature=1.0,
        top_k=None, top_p=None, min_p=None, eos_ids=(), pad_id=0, rows=rows,
        cache_sharding=gen.cache_sharding_for(rows, model.config, 8, 8 + 3)).compile()
    return common.loop_launches(compiled.as_text())["by_op"]

  assert step_ops(sharded).get("all-gather", 0) >= 2 * model.config.num_hidden_layers
  assert step_ops(gathered).get("all-gather", 0) == 0
  # host leaves (a PEFT base kept in host memory) stay host arrays: jit places them as before
  kernel = sharded["layers"][0]["self_attn"]["q_proj"]["kernel"].value
  moved = shd.gather_over_batch_axes(dict(host=np.ones(4, np.float32), kernel=kernel))
  assert isinstance(moved["host"], np.ndarray)
  assert moved["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")


def test_default_bits_per_pass_follows_the_gpu_measurement():
  """The 4-bit threshold search on a GPU below batch 64 (measured faster there), the bisection at
  64 and above and on CPUs (where it is faster); both find the same thresholds (tested above)."""
  assert [default_bits_per_pass(b, "gpu") for b in (1, 16, 63, 64, 256)] == [4, 4, 4, 1, 1]
  assert default_bits_per_pass(1, "cuda") == 4 and default_bits_per_pass(1, "cpu") == 1
  if jax.default_backend() == "cpu":
    assert default_bits_per_pass(1) == 1


def test_min_decode_rows_pads_one_prompt_on_one_gpu_only():
  """One prompt on one GPU decodes as two rows (XLA's GPU compiler turns a one-row matmul into a
  multiply + reduction that writes the weight-sized product); anything else is left alone."""
  from postrl.sampling.generate import min_decode_rows  # pylint: disable=import-outside-toplevel
  assert [min_decode_rows(1, p, 1) for p in ("gpu", "cuda", "rocm")] == [2, 2, 2]
  assert min_decode_rows(1, "cpu", 1) == 1 and min_decode_rows(1, "tpu", 1) == 1
  assert min_decode_rows(1, "gpu", 2) == 1  # a mesh: each device decodes its own rows
  assert [min_decode_rows(b, "gpu", 1) for b in (2, 3, 64)] == [2, 3, 64]
  assert min_decode_rows(1, "gpu", 1, small_float_matmuls=False) == 1  # quantized blocks


def test_small_float_matmuls_are_found_and_quantized_storage_is_not():
  """A SmolLM2-135M-shaped model has float projections far below XLA's 10M-element threshold;
  quantized to int8 its block matmuls are kernels and only the 28M-element embedding (the tied
  output projection) is float. A small model's embedding alone counts."""
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  from postrl.quant import quantize_model  # pylint: disable=import-outside-toplevel
  from postrl.sampling.generate import has_small_float_matmuls  # pylint: disable=import-outside-toplevel
  cfg = common.model_config("smollm2-135m", param_dtype="bfloat16", dtype="bfloat16")

  def quantized():
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    quantize_model(m, "int8")
    return m

  float_params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  assert has_small_float_matmuls(float_params)
  assert not has_small_float_matmuls(nnx.state(nnx.eval_shape(quantized)))
  tiny = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  quantize_model(tiny, "int8")
  assert has_small_float_matmuls(nnx.state(tiny))  # its [101, 64] embedding


@pytest.mark.parametrize("eos_ids", [(), (4,)])
def test_padded_single_row_decodes_row_zero_of_a_duplicated_batch(model, eos_ids):
  """``min_rows=2`` at B = 1 returns exactly row 0 of the same call on the prompt given twice
  (same key, same draws), with [1, ...] outputs; ``generate`` on a CPU does not pad (B = 1 and an
  explicit B = 1 compile give the same tokens)."""
  import importlib  # pylint: disable=import-outside-toplevel
  gen = importlib.import_module("postrl.sampling.generate")
  graphdef, params = nnx.split(model)
  tokens, lengths = pad_prompts([PROMPTS[0]])
  kw = dict(max_new_tokens=10, temperature=1.0, top_k=None, top_p=0.9, min_p=None,
            eos_ids=eos_ids, pad_id=0)
  key = jax.random.key(7)
  padded = gen._generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), key,  # pylint: disable=protected-access
                         min_rows=2, **kw)
  twice = gen._generate(graphdef, params, jnp.asarray(np.repeat(tokens, 2, 0)),  # pylint: disable=protected-access
                        jnp.asarray(np.repeat(lengths, 2, 0)), key, **kw)
  for got, want in zip(padded, twice):
    assert got.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[:1])
  plain = gen._generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), key, **kw)  # pylint: disable=protected-access
  out = generate(model, tokens, lengths, key=key, max_new_tokens=10, top_p=0.9, eos_ids=eos_ids)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.asarray(plain.tokens_BxN))


def test_generate_passes_the_padded_rows_through(model, monkeypatch):
  """``generate`` decodes the rows ``min_decode_rows`` asks for and returns the caller's B: with
  the GPU answer forced on this CPU, B = 1 gives [1, N] outputs equal to row 0 of the prompt
  given twice."""
  import importlib  # pylint: disable=import-outside-toplevel
  gen = importlib.import_module("postrl.sampling.generate")
  tokens, lengths = pad_prompts([PROMPTS[2]])
  kw = dict(key=jax.random.key(11), max_new_tokens=9, temperature=0.8, top_k=9, eos_ids=())
  twice = generate(model, np.repeat(tokens, 2, 0), np.repeat(lengths, 2, 0), **kw)
  monkeypatch.setattr(gen, "min_decode_rows",
                      lambda batch, platform, devices, small=True: max(batch, 2))
  out = generate(model, tokens, lengths, **kw)
  for got, want in zip(out, twice):
    assert got.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[:1])
