"""perplexity / token_nll: hand-computed NLL of a tiny model, uniform logits, masks, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.evaluate import perplexity, token_nll
from postrl.models import Transformer
from tests.conftest import tiny_config

V = 101


@pytest.fixture(scope="module")
def model():
  return Transformer(tiny_config(vocab_size=V), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, V, size=(5, 9)).astype(np.int32)


def _hand_nll(model, tokens, mask=None):
  """-log softmax(model(tokens))[t-1, tokens[t]] summed over t >= 1 (where the mask is 1)."""
  logp = jax.nn.log_softmax(np.asarray(model(jnp.asarray(tokens)), np.float64), axis=-1)
  picked = np.take_along_axis(np.asarray(logp)[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  mask = np.ones_like(picked) if mask is None else mask[:, 1:]
  return -(picked * mask).sum(), mask.sum()


def test_perplexity_is_exp_of_the_hand_computed_mean_nll(model, tokens):
  nll, n = _hand_nll(model, tokens)
  assert n == 5 * 8  # window starts are not predicted
  total, count = token_nll(model, tokens, batch_size=2)  # 3 batches, the last one padded
  assert count == 40
  np.testing.assert_allclose(total, nll, rtol=1e-5)
  np.testing.assert_allclose(perplexity(model, tokens, batch_size=2), np.exp(nll / n), rtol=1e-5)
  np.testing.assert_allclose(perplexity(model, tokens, batch_size=5, chunk=4, vocab_chunk=32),
                             np.exp(nll / n), rtol=1e-5)


def test_perplexity_with_a_mask(model, tokens):
  mask = np.random.default_rng(1).integers(0, 2, size=tokens.shape).astype(np.int32)
  mask[:, 0] = 1  # ignored: the first token of a window is never predicted
  nll, n = _hand_nll(model, tokens, mask)
  total, count = token_nll(model, tokens, batch_size=2, mask_BxT=mask)
  assert count == n
  np.testing.assert_allclose(total, nll, rtol=1e-5)


def test_uniform_logits_give_the_vocabulary_size(tokens):
  uniform = Transformer(tiny_config(vocab_size=V), rngs=nnx.Rngs(1))
  uniform.norm.weight[...] = jnp.zeros_like(uniform.norm.weight[...])  # h = 0 -> logits 0
  np.testing.assert_allclose(perplexity(uniform, tokens, batch_size=2), V, rtol=1e-5)


def test_bad_input_errors(model, tokens):
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 101\)"):
    perplexity(model, tokens + V, batch_size=2)
  with pytest.raises(ValueError, match="T >= 2"):
    perplexity(model, tokens[:, :1], batch_size=2)
  with pytest.raises(ValueError, match="no token to predict"):
    perplexity(model, tokens, batch_size=2, mask_BxT=np.zeros_like(tokens))
  with pytest.raises(ValueError, match="mask_BxT has shape"):
    perplexity(model, tokens, batch_size=2, mask_BxT=np.ones((5, 3)))
