"""token_logps: shift once, mask, chunk; chunked == full, masked == sliced, gradients equal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.logprobs import logps_from_hidden, model_apply_fn, token_logps
from postrl.models import Transformer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def setup():
  model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 101, (3, 13)), jnp.int32)
  return model, model_apply_fn(graphdef), params, tokens


def test_matches_manual_log_softmax(setup):
  model, apply_fn, params, tokens = setup
  logits = model(tokens)
  manual = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
  out = token_logps(apply_fn, params, tokens)
  np.testing.assert_allclose(out[:, 1:], manual, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[:, 0], 0.0)


@pytest.mark.parametrize("chunk,vocab_chunk", [(1, None), (4, None), (5, None), (12, None),
                                                (64, None), (None, 16), (None, 33), (5, 7),
                                                (4, 101), (None, 500)])
def test_chunked_equals_full(setup, chunk, vocab_chunk):
  _, apply_fn, params, tokens = setup
  np.testing.assert_allclose(
      token_logps(apply_fn, params, tokens, chunk=chunk, vocab_chunk=vocab_chunk),
      token_logps(apply_fn, params, tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk,vocab_chunk", [(5, None), (None, 16), (4, 33)])
def test_chunked_gradients_equal_full(setup, chunk, vocab_chunk):
  _, apply_fn, params, tokens = setup
  mask = (jnp.arange(13)[None] >= 4).astype(jnp.float32) * jnp.ones((3, 1))

  def loss(p, chunk, vocab_chunk):
    return -jnp.sum(token_logps(apply_fn, p, tokens, mask, chunk=chunk, vocab_chunk=vocab_chunk))

  g_full = jax.grad(loss)(params, None, None)
  g_chunk = jax.grad(loss)(params, chunk, vocab_chunk)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
    # composite tolerance 1e-5, relative to each gradient's scale (near-zero entries cancel)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


def test_vocab_chunked_logits_never_materialise():
  """The compiled forward+backward keeps no buffer as large as [B, T, V] when both chunks are set."""
  rng = np.random.RandomState(2)
  B, T, D, V = 2, 256, 16, 4096  # logits (8 MB) dwarf W (256 KB) and its gradient
  h = jnp.asarray(rng.randn(B, T, D), jnp.float32)
  w = jnp.asarray(rng.randn(D, V) * 0.1, jnp.float32)
  t = jnp.asarray(rng.randint(0, V, (B, T)))

  def loss(h, w, chunk, vocab_chunk):
    return -logps_from_hidden(h, w, t, chunk=chunk, vocab_chunk=vocab_chunk).sum()

  def temp_bytes(chunk, vocab_chunk):
    fn = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=(2, 3))
    return fn.lower(h, w, chunk, vocab_chunk).compile().memory_analysis().temp_size_in_bytes

  full = B * T * V * 4
  assert temp_bytes(None, None) >= full
  assert temp_bytes(16, 512) < full / 4
  g_full = jax.grad(loss, argnums=(0, 1))(h, w, None, None)
  g_chunk = jax.grad(loss, argnums=(0, 1))(h, w, 16, 512)
  for a, b in zip(g_full, g_chunk):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_masked_equals_sliced(setup):
  _, apply_fn, params, tokens = setup
  # Right padding beyond length 9 and a response mask from position 5: the kept values equal those
  # of the unpadded sequence, the rest are exactly zero.
  seg = (jnp.arange(13)[None] < 9).astype(jnp.int32) * jnp.ones((3, 1), jnp.int32)
  mask = ((jnp.arange(13)[None] >= 5) & (jnp.arange(13)[None] < 9)).astype(jnp.float32)
  padded = token_logps(apply_fn, params, tokens, mask * jnp.ones((3, 1)), segment_ids_BxT=seg)
  sliced = token_logps(apply_fn, params, tokens[:, :9])
  np.testing.assert_allclose(padded[:, 5:9], sliced[:, 5:9], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(padded[:, :5], 0.0)
  np.testing.assert_array_equal(padded[:, 9:], 0.0)


def test_packed_segments_equal_separate(setup):
  _, apply_fn, params, tokens = setup
  packed = jnp.concatenate([tokens[:1, :6], tokens[1:2, :7]], axis=1)
  seg = jnp.asarray([[1] * 6 + [2] * 7])
  out = token_logps(apply_fn, params, packed, segment_ids_BxT=seg)
  np.testing.assert_allclose(out[:, :6], token_logps(apply_fn, params, tokens[:1, :6]), atol=1e-6)
  np.testing.assert_allclose(out[:, 6:], token_logps(apply_fn, params, tokens[1:2, :7]), atol=1e-6)


def test_logps_from_hidden_uneven_chunks():
  rng = np.random.RandomState(1)
  h = jnp.asarray(rng.randn(2, 7, 8), jnp.float32)
  w = jnp.asarray(rng.randn(8, 11), jnp.float32)
  t = jnp.asarray(rng.randint(0, 11, (2, 7)))
  ref = jnp.take_along_axis(jax.nn.log_softmax(h @ w), t[..., None], -1)[..., 0]
  np.testing.assert_allclose(logps_from_hidden(h, w, t, chunk=3), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logps_from_hidden(h, w, t, vocab_chunk=4), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logps_from_hidden(h, w, t, chunk=3, vocab_chunk=5), ref, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(chunk=0), "^chunk must be an integer >= 1 or None .*, got 0$"),  # ZeroDivisionError
    (dict(chunk=-3), "^chunk must be an integer >= 1 or None .*, got -3$"),
    (dict(chunk=2.5), "^chunk must be an integer >= 1 or None .*, got 2.5$"),
    (dict(vocab_chunk=0), "^vocab_chunk must be an integer >= 1 or None .*, got 0$"),
    (dict(vocab_chunk=-1), "^vocab_chunk must be an integer >= 1 or None .*, got -1$"),
])
def test_bad_chunk_sizes_are_config_errors(kwargs, message):
  from postrl.models import ConfigError  # pylint: disable=import-outside-toplevel
  h, w, t = jnp.zeros((2, 7, 8)), jnp.zeros((8, 11)), jnp.zeros((2, 7), jnp.int32)
  with pytest.raises(ConfigError, match=message):
    logps_from_hidden(h, w, t, **kwargs)


def test_logps_from_hidden_refuses_mismatched_shapes():
  rng = np.random.RandomState(1)
  h = jnp.asarray(rng.randn(2, 7, 8), jnp.float32)
  w = jnp.asarray(rng.randn(8, 11), jnp.float32)
  t = jnp.asarray(rng.randint(0, 11, (2, 7)))
  # one row of targets used to broadcast over both rows of h: a silently wrong result
  for h_, w_, t_ in ((h, w, t[:1]), (h, w, t[:, :5]), (h, w[:5], t), (h[0], w, t[0])):
    with pytest.raises(ValueError, match="needs h_BxTxD \\[B, T, D\\], w_DxV \\[D, V\\]"):
      logps_from_hidden(h_, w_, t_)
  with pytest.raises(ValueError, match="targets_BxT must be integer token ids, got dtype float32"):
    logps_from_hidden(h, w, t.astype(jnp.float32))


def test_vocab_chunks_with_narrow_integer_targets():
  """uint8 ids (V > 256) once gave chunk starts that wrapped at 256 and picked wrong columns."""
  rng = np.random.RandomState(3)
  h = jnp.asarray(rng.randn(2, 7, 8), jnp.float32)
  w = jnp.asarray(rng.randn(8, 300), jnp.float32)
  t = rng.randint(0, 200, (2, 7))
  ref = logps_from_hidden(h, w, jnp.asarray(t))
  for dtype in (np.uint8, np.int16, np.uint16):
    np.testing.assert_allclose(logps_from_hidden(h, w, jnp.asarray(t.astype(dtype)),
                                                 vocab_chunk=64), ref, rtol=1e-5, atol=1e-5)


def test_token_logps_refuses_bad_shapes(setup):
  _, apply_fn, params, tokens = setup
  B, T = tokens.shape
  # the targets' shape [B, T - 1] (an off-by-one) and [B] (broadcast over positions when B == T)
  for mask in (jnp.ones((B, T - 1)), jnp.ones((B,)), jnp.ones((T,)), jnp.ones((B, T, 1))):
    with pytest.raises(ValueError,
                       match=f"mask_BxT must be \\[B, T\\] like tokens_BxT \\({B}, {T}\\)"):
      token_logps(apply_fn, params, tokens, mask)
  with pytest.raises(ValueError, match="segment_ids_BxT must be \\[B, T\\]"):
    token_logps(apply_fn, params, tokens, segment_ids_BxT=jnp.ones((B, T - 1), jnp.int32))
  # T = 0 returned [B, 1] (the shift's padding column), not [B, 0]
  with pytest.raises(ValueError, match="must be \\[B, T\\] with T >= 1, got shape \\(3, 0\\)"):
    token_logps(apply_fn, params, tokens[:, :0])
  with pytest.raises(ValueError, match="must be \\[B, T\\] with T >= 1, got shape \\(13,\\)"):
    token_logps(apply_fn, params, tokens[0])
  with pytest.raises(ValueError, match="tokens_BxT must be integer token ids, got dtype float32"):
    token_logps(apply_fn, params, tokens.astype(jnp.float32))
  # bool / int / float masks, and [1, T] / [B, 1] masks broadcast, all give the same values
  full = token_logps(apply_fn, params, tokens)
  m = (jnp.arange(T)[None] >= 4) & jnp.ones((B, 1), bool)
  for mask in (m, m.astype(jnp.int32), m.astype(jnp.float32), m[:1]):
    np.testing.assert_array_equal(token_logps(apply_fn, params, tokens, mask), full * m)
  np.testing.assert_array_equal(token_logps(apply_fn, params, tokens, jnp.ones((B, 1))), full)
