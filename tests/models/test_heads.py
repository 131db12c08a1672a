"""Scalar heads: last-token pooling, padding invariance, gradients, sharding names."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postrl import sharding
from postrl.losses import bradley_terry
from postrl.models import Transformer
from postrl.models.heads import ScoredTransformer, last_token_index
from tests.conftest import tiny_config


def _rm():
  return ScoredTransformer(Transformer(tiny_config(vocab_size=128), rngs=nnx.Rngs(0)),
                           rngs=nnx.Rngs(1))


def test_last_token_index():
  seg = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(last_token_index(seg), [2, 4, 0])


def test_padded_score_equals_unpadded_and_reads_the_last_token():
  rm = _rm()
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 128, (2, 9)), jnp.int32)
  seg = jnp.asarray([[1] * 6 + [0] * 3, [1] * 9], jnp.int32)
  padded = rm(tokens, seg)
  np.testing.assert_allclose(padded[0], rm(tokens[:1, :6])[0], rtol=1e-5)
  np.testing.assert_allclose(padded[1], rm(tokens[1:])[0], rtol=1e-5)
  per_token = rm.token_scores(tokens[:1, :6])
  np.testing.assert_allclose(padded[0], per_token[0, 5], rtol=1e-5)
  # the padding's content does not matter
  garbage = tokens.at[0, 6:].set(7)
  np.testing.assert_allclose(rm(garbage, seg), padded, rtol=1e-6)


def test_bradley_terry_gradients_reach_head_and_backbone():
  rm = _rm()
  graphdef, params = nnx.split(rm)
  rng = np.random.RandomState(1)
  chosen = jnp.asarray(rng.randint(3, 128, (3, 8)), jnp.int32)
  rejected = jnp.asarray(rng.randint(3, 128, (3, 8)), jnp.int32)

  def loss(p):
    model = nnx.merge(graphdef, p)
    return bradley_terry(model(chosen), model(rejected))[0]

  grads = jax.grad(loss)(params)
  assert float(jnp.abs(grads["head"]["kernel"][...]).sum()) > 0
  assert float(jnp.abs(grads["backbone"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]).sum()) > 0


def test_head_has_logical_axes_for_sharding():
  rm = _rm()
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  shardings = sharding.state_shardings(nnx.state(rm), mesh)
  assert shardings["head"]["kernel"].get_value().spec == jax.sharding.PartitionSpec("fsdp", None)
