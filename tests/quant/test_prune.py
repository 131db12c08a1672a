"""Pruning: exact sparsity, the N:M pattern, Wanda's per-output comparison, SparseGPT's lower
reconstruction error, the model transform and its errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.models import Transformer
from postrl.quant import QuantError, linear_layers, quantize_model
from postrl.quant.prune import (magnitude_prune, prune_model, sparsegpt_prune, sparsity_of,
                                wanda_prune)
from tests.conftest import tiny_config


def _structured(K=256, N=64, n=1024, seed=0):
  """Activations with a few high-variance input channels and correlations between channels."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, K)).astype(np.float32)
  x[:, rng.choice(K, 8, replace=False)] *= 20.0
  x += 0.5 * x[:, :1] / 20.0
  w = rng.standard_normal((K, N)).astype(np.float32)
  return x, w, (2.0 * x.T @ x / n).astype(np.float32), (x * x).sum(0)


def _two_four(w):
  g = (np.asarray(w) == 0).reshape(-1, 4, np.shape(w)[1]).sum(axis=1)
  return bool(np.all(g >= 2))


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_exact_sparsity(sparsity):
  x, w, h, sq = _structured()
  K, N = w.shape
  assert np.sum(np.asarray(magnitude_prune(w, sparsity=sparsity)) == 0) == int(sparsity * K * N)
  per_out = (np.asarray(wanda_prune(w, sq, sparsity=sparsity)) == 0).sum(axis=0)
  np.testing.assert_array_equal(per_out, int(sparsity * K))
  sg = np.asarray(sparsegpt_prune(w, h, sparsity=sparsity))
  per_block = (sg == 0).reshape(2, 128 * N).sum(axis=1)  # K = 256: two blocks of 128 rows
  np.testing.assert_array_equal(per_block, int(sparsity * 128 * N))


def test_two_four_pattern():
  x, w, h, sq = _structured()
  for pruned in (magnitude_prune(w, pattern="2:4"), wanda_prune(w, sq, pattern="2:4"),
                 sparsegpt_prune(w, h, pattern="2:4")):
    assert _two_four(pruned) and sparsity_of(pruned) == 0.5
  # SparseGPT keeps the weights it does not prune but updates them (OBS compensation)
  sg = np.asarray(sparsegpt_prune(w, h, pattern="2:4"))
  kept = sg != 0
  assert not np.allclose(sg[kept], w[kept])


def test_wanda_compares_per_output():
  # Column 0 has large weights everywhere: a per-layer threshold would prune column 1 only.
  w = np.array([[10.0, 1.0], [20.0, 2.0], [30.0, 3.0], [40.0, 4.0]], np.float32)
  norms_sq = np.array([16.0, 1.0, 1.0, 1.0])  # ||X_0|| = 4
  # scores: col 0 = [40, 20, 30, 40], col 1 = [4, 2, 3, 4]
  got = np.asarray(wanda_prune(w, norms_sq, sparsity=0.5))
  expect = np.array([[10.0, 1.0], [0, 0], [0, 0], [40.0, 4.0]], np.float32)
  np.testing.assert_array_equal(got, expect)
  mag = np.asarray(magnitude_prune(w, sparsity=0.5))
  assert np.all(mag[:, 1] == 0) and np.all(mag[:, 0] != 0)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_error_below_wanda_and_magnitude(pattern):
  x, w, h, sq = _structured()
  err = lambda wp: float(np.linalg.norm(x @ w - x @ np.asarray(wp)))
  e_mag = err(magnitude_prune(w, pattern=pattern))
  e_wanda = err(wanda_prune(w, sq, pattern=pattern))
  e_sgpt = err(sparsegpt_prune(w, h, pattern=pattern))
  assert e_sgpt < e_wanda and e_sgpt < e_mag, (e_sgpt, e_wanda, e_mag)
  if pattern == "unstructured":
    assert e_wanda < e_mag


def test_sparsegpt_zero_sparsity_is_identity():
  _, w, h, _ = _structured(K=128, N=16)
  np.testing.assert_allclose(np.asarray(sparsegpt_prune(w, h, sparsity=0.0)), w, rtol=1e-5,
                             atol=1e-5)


def test_prune_model():
  cfg = tiny_config()
  base = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16))
  m = nnx.clone(base)
  got = prune_model(m, "magnitude", sparsity=0.5)
  assert len(got) == 14 and set(got.values()) == {0.5}
  for method in ("wanda", "sparsegpt"):
    m = nnx.clone(base)
    got = prune_model(m, method, pattern="2:4", calib_tokens=tokens)
    assert set(got.values()) == {0.5}
    assert all(_two_four(lin.kernel[...]) for lin in linear_layers(m).values())
    assert np.all(np.isfinite(np.asarray(m(tokens))))
  m = nnx.clone(base)
  got = prune_model(m, "wanda", sparsity=0.25, calib_tokens=tokens, targets=r"mlp\.up_proj")
  assert sorted(got) == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
  assert np.all(np.asarray(m.layers[0].mlp.down_proj.kernel[...]) != 0)


def test_bad_input():
  cfg = tiny_config()
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8))
  for bad in (1.0, -0.1, 1.5):
    with pytest.raises(QuantError, match=r"sparsity must be a number in \[0, 1\)"):
      prune_model(model, "magnitude", sparsity=bad)
  with pytest.raises(QuantError, match="unknown pruning method 'obs'"):
    prune_model(model, "obs")
  for method in ("wanda", "sparsegpt"):
    with pytest.raises(QuantError, match="needs calibration data"):
      prune_model(model, method)
  with pytest.raises(QuantError, match="means sparsity 0.5"):
    prune_model(model, "magnitude", sparsity=0.7, pattern="2:4")
  with pytest.raises(QuantError, match="'unstructured' or 'n:m'"):
    prune_model(model, "magnitude", pattern="blocks")
  with pytest.raises(QuantError, match="0 < n < m"):
    prune_model(model, "magnitude", sparsity=0.5, pattern="4:2")
  with pytest.raises(QuantError, match="divisible by 4"):
    magnitude_prune(np.ones((6, 3), np.float32), pattern="2:4", name="layers.0.x")
  with pytest.raises(QuantError, match="matches no Linear"):
    prune_model(model, "magnitude", targets="lm_head")  # not in the blocks
  quantize_model(model, "int8")
  with pytest.raises(QuantError, match="quantized"):
    prune_model(model, "wanda", calib_tokens=tokens)
  assert jnp.all(jnp.isfinite(model(tokens)))
