"""AWQ: α = 0 is RTN exactly, the searched scale never does worse than RTN on the calibration
data (and better with salient channels), the scale folds leave the float model unchanged."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.models import Transformer
from postrl.quant import QuantError, QuantizedWeight, linear_layers, quantize_model, rtn_quantize
from postrl.quant.awq import (awq_clip, awq_quantize, awq_quantize_model, awq_search_scale,
                              fold_scale, output_mse)
from tests.conftest import tiny_config


def _salient_data(K=128, N=48, n=512, seed=0):
  """Activations with a few large (salient) input channels, as AWQ observes in LLMs."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, K)).astype(np.float32)
  x[:, rng.choice(K, 6, replace=False)] *= 15.0
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  return x, w, (2.0 * x.T @ x / n).astype(np.float32), np.abs(x).mean(0)


def _out_err(x, w, qw, s):
  """||Q(W diag(s)) (diag(s)^-1 X) - W X||_F, computed from the activations themselves."""
  return float(np.linalg.norm((x / np.asarray(s)) @ np.asarray(qw.dequantize()) - x @ w))


def test_alpha_zero_is_rtn_exactly():
  x, w, h, m = _salient_data()
  qw, s = awq_quantize(w, h, m, "int4_g32", n_grid=1)  # the grid {0}
  np.testing.assert_array_equal(np.asarray(s), np.ones(w.shape[0]))
  rtn = rtn_quantize(w, "int4_g32")
  np.testing.assert_array_equal(np.asarray(qw.codes()), np.asarray(rtn.codes()))
  np.testing.assert_array_equal(np.asarray(qw.scales[...]), np.asarray(rtn.scales[...]))


@pytest.mark.parametrize("spec", ["int4_g32", "int4_g32_asym"])
def test_search_not_worse_than_rtn(spec):
  x, w, h, m = _salient_data()
  s, alpha, losses = awq_search_scale(w, h, m, spec)
  # losses are the output MSE over the calibration tokens, through H
  rtn = rtn_quantize(w, spec)
  rtn_err = _out_err(x, w, rtn, np.ones(w.shape[0]))
  np.testing.assert_allclose(losses[0], rtn_err ** 2 / (x.shape[0] * w.shape[1]), rtol=1e-3)
  qw, s2 = awq_quantize(w, h, m, spec)
  np.testing.assert_allclose(np.asarray(s2), np.asarray(s))
  err = _out_err(x, w, qw, s)
  assert alpha > 0 and err < 0.9 * rtn_err, (alpha, err, rtn_err)
  assert losses.shape == (20,) and np.argmin(losses) == round(alpha * 20)


def test_clip_search():
  x, w, h, m = _salient_data()
  w = w.copy()
  w[3, :5] = 1.0  # weight outliers: clipping them helps
  same = awq_clip(w, h, "int4_g32", max_shrink=0.0)
  np.testing.assert_array_equal(np.asarray(same), w)
  clipped = np.asarray(awq_clip(w, h, "int4_g32"))
  assert np.all(np.abs(clipped) <= np.abs(w) + 1e-7)
  e = lambda v: float(output_mse(jnp.asarray(w) - rtn_quantize(v, "int4_g32").dequantize(),
                                 jnp.asarray(h)))
  assert e(clipped) <= e(w)


def test_fold_scale_keeps_the_float_model():
  cfg = tiny_config()  # 4 query heads, 2 key/value heads: o_proj's scale is tied per group
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
  ref = np.asarray(model(tokens))
  rng = np.random.default_rng(1)
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
  s_v = rng.uniform(0.3, 3.0, (cfg.num_key_value_heads, 1, hd))
  s_o = np.broadcast_to(s_v, (cfg.num_key_value_heads, 2, hd)).reshape(-1)
  for i in range(cfg.num_hidden_layers):
    fold_scale(model, i, "qkv", rng.uniform(0.3, 3.0, d))
    fold_scale(model, i, "o", s_o)
    fold_scale(model, i, "gate_up", rng.uniform(0.3, 3.0, d))
    fold_scale(model, i, "down", rng.uniform(0.3, 3.0, f))
  np.testing.assert_allclose(np.asarray(model(tokens)), ref, rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(model.layers[0].input_layernorm.weight[...]), 1.0)
  with pytest.raises(QuantError, match="query heads that share"):
    fold_scale(model, 0, "o", rng.uniform(0.3, 3.0, d))
  with pytest.raises(QuantError, match="kind must be"):
    fold_scale(model, 0, "qk", np.ones(d))


def test_model_transform():
  cfg = tiny_config(intermediate_size=64, num_key_value_heads=4)  # fewer distinct shapes
  base = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16))
  # α grid {0}, no clipping: exactly RTN
  model = nnx.clone(base)
  alphas = awq_quantize_model(model, tokens, "int4_g32", n_grid=1, clip=False)
  assert set(alphas.values()) == {0.0} and len(alphas) == 14
  rtn = quantize_model(nnx.clone(base), "int4_g32")
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(rtn(tokens)))
  # the full search (with clipping): every layer quantized, scales folded, finite outputs
  model = nnx.clone(base)
  alphas = awq_quantize_model(model, tokens, "int4_g32", n_grid=4)
  assert len(alphas) == 14 and set(alphas.values()) <= {0.0, 0.25, 0.5, 0.75}
  assert all(isinstance(lin.kernel, QuantizedWeight) for lin in linear_layers(model).values())
  assert np.all(np.isfinite(np.asarray(model(tokens))))
  with pytest.raises(QuantError, match="n_grid"):
    awq_quantize_model(nnx.clone(base), tokens, n_grid=0)
  with pytest.raises(QuantError, match="matches no float Linear"):
    awq_quantize_model(nnx.clone(base), tokens, targets="nothing_matches")
