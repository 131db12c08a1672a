"""SmoothQuant: the scale formula, scaling invariance of the smoothed float model, W8A8 error below
naive W8A8 with outlier channels, the integer matmul equal to its fake-quant reference."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.models import Transformer
from postrl.quant import INT8, QuantError, linear_layers, rtn_quantize
from postrl.quant.calibrate import calibrate
from postrl.quant.smoothquant import (W8A8Weight, fake_quant_per_token, quantize_per_token,
                                      smooth_model, smoothing_scales, smoothquant_model)
from tests.conftest import tiny_config


def test_smoothing_scales_formula():
  x_max = np.array([4.0, 1.0, 100.0])
  w = np.array([[1.0, -2.0], [0.5, 0.25], [-0.01, 0.04]])  # row maxima 2, 0.5, 0.04
  np.testing.assert_allclose(smoothing_scales(x_max, w, alpha=0.5),
                             np.sqrt(x_max) / np.sqrt([2.0, 0.5, 0.04]), rtol=1e-6)
  np.testing.assert_allclose(smoothing_scales(x_max, w, alpha=1.0), x_max, rtol=1e-6)
  np.testing.assert_allclose(smoothing_scales(x_max, w, alpha=0.0), 1 / np.array([2, 0.5, 0.04]),
                             rtol=1e-6)
  with pytest.raises(QuantError, match="alpha"):
    smoothing_scales(x_max, w, alpha=1.5)


def test_per_token_quantization():
  x = np.array([[0.5, -1.0, 0.25], [100.0, 1.0, -3.0]], np.float32)
  q, s = quantize_per_token(x)
  np.testing.assert_allclose(np.asarray(s)[:, 0], [1.0 / 127, 100.0 / 127], rtol=1e-6)
  assert np.abs(np.asarray(q)).max() == 127
  err = np.abs(np.asarray(fake_quant_per_token(x)) - x)
  assert np.all(err <= np.asarray(s) / 2 + 1e-7)  # per-token bound s_t / 2


def _outlier_layer(K=64, N=32, n=256, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, K)).astype(np.float32)
  x[:, [3, 17, 40]] *= 60.0  # activation outlier channels (SmoothQuant Fig. 4)
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  return x, w


def test_w8a8_error_below_naive():
  x, w = _outlier_layer()
  y = x @ w
  naive = W8A8Weight.from_float(w).dot(jnp.asarray(x))
  s = np.asarray(smoothing_scales(np.abs(x).max(0), w, alpha=0.5))
  smooth = W8A8Weight.from_float(w * s[:, None]).dot(jnp.asarray(x / s))
  e_naive, e_smooth = np.linalg.norm(naive - y), np.linalg.norm(smooth - y)
  assert e_smooth < 0.5 * e_naive, (e_smooth, e_naive)
  # migration in float is exact: (X diag(s)^-1)(diag(s) W) = X W
  np.testing.assert_allclose((x / s) @ (w * s[:, None]), y, rtol=1e-4, atol=1e-4)


def test_integer_matmul_equals_fake_quant_reference():
  x, w = _outlier_layer(seed=1)
  qw = W8A8Weight.from_float(w)
  assert qw.w_q[...].dtype == jnp.int8 and qw.scales.shape == (1, 32)
  ref = np.asarray(fake_quant_per_token(x)) @ np.asarray(rtn_quantize(w, INT8).dequantize())
  np.testing.assert_allclose(np.asarray(qw.dot(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-4)
  x3 = jnp.asarray(x[:12].reshape(3, 4, 64), jnp.bfloat16)  # [B, T, K] in bfloat16
  y3 = qw.dot(x3)
  assert y3.shape == (3, 4, 32) and y3.dtype == jnp.bfloat16


def test_smooth_model_invariance_and_w8a8_model():
  cfg = tiny_config()
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  # give the first block's attention input an outlier channel, as in real LLMs
  model.layers[0].input_layernorm.weight[...] = model.layers[0].input_layernorm.weight[...].at[
      5].set(40.0)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 12))
  ref = np.asarray(model(tokens))
  smoothed = nnx.clone(model)
  scales = smooth_model(smoothed, calibrate(smoothed, tokens, with_hessian=False))
  assert sorted(scales) == ["layers.0.gate_up", "layers.0.qkv", "layers.1.gate_up",
                            "layers.1.qkv"]
  np.testing.assert_allclose(np.asarray(smoothed(tokens)), ref, rtol=1e-5, atol=1e-5)
  assert float(smoothed.layers[0].input_layernorm.weight[5]) < 40.0  # outlier migrated

  w8a8 = nnx.clone(model)
  smoothquant_model(w8a8, tokens)
  naive = nnx.clone(model)
  smoothquant_model(naive, tokens, smooth=False)
  assert all(isinstance(lin.kernel, W8A8Weight) for lin in linear_layers(w8a8).values())
  e = lambda m: float(np.linalg.norm(np.asarray(m(tokens)) - ref))
  assert e(w8a8) < e(naive)
  with pytest.raises(QuantError, match="alpha"):
    smoothquant_model(nnx.clone(model), tokens, alpha=-0.1)
  with pytest.raises(QuantError, match="must be float"):
    smooth_model(w8a8, calibrate(model, tokens, with_hessian=False))
