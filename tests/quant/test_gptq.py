"""GPTQ: agreement with a line-by-line NumPy transcription of the reference algorithm, lower
layer reconstruction error than RTN on the same calibration data, valid codes, model transform."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.models import Transformer
from postrl.quant import (QuantError, QuantizedWeight, linear_layers, quantize_model,
                          rtn_quantize)
from postrl.quant.calibrate import calibrate
from postrl.quant.gptq import gptq_quantize, gptq_quantize_model, layer_error
from tests.conftest import tiny_config


def _calib_data(K, N, n=1024, seed=0):
  """Correlated inputs with a few high-variance channels (what real activations look like)."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n, K // 4)).astype(np.float32)
  mix = rng.standard_normal((K // 4, K)).astype(np.float32)
  x = z @ mix + 0.3 * rng.standard_normal((n, K)).astype(np.float32)
  x[:, rng.choice(K, 4, replace=False)] *= 8.0
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  return x, w, (2.0 * x.T @ x / n).astype(np.float32)


def _err(x, w, w_hat):
  return float(np.linalg.norm(x @ w - x @ np.asarray(w_hat)))


def _reference_gptq(w_KxN, h, *, bits, gs, blocksize, percdamp, actorder, static_groups):
  """NumPy transcription of the reference ``GPTQ.fasterquant`` (IST-DASLab/gptq), in its [out, in]
  layout and float64, with the symmetric absmax quantizer of ``postrl.quant.formats``."""
  W = w_KxN.T.astype(np.float64).copy()
  H = h.astype(np.float64).copy()
  N, K = W.shape
  qmax = 2 ** (bits - 1) - 1
  params = lambda sub: np.abs(sub).max(axis=1) / qmax
  quant = lambda w, s: np.clip(np.round(w / np.where(s > 0, s, 1)), -qmax, qmax) * s
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  groups = [params(W[:, i:i + gs]) for i in range(0, K, gs)] if static_groups else None
  scale = params(W) if gs is None else None
  if actorder:
    perm = np.argsort(-np.diag(H), kind="stable")
    W, H = W[:, perm], H[perm][:, perm]
  Q = np.zeros_like(W)
  H += percdamp * np.mean(np.diag(H)) * np.eye(K)
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
  for i1 in range(0, K, blocksize):
    i2 = min(i1 + blocksize, K)
    W1, Q1, Err1 = W[:, i1:i2].copy(), np.zeros((N, i2 - i1)), np.zeros((N, i2 - i1))
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w, d = W1[:, i], Hinv1[i, i]
      if gs is not None:
        if not static_groups:
          if (i1 + i) % gs == 0:
            scale = params(W[:, i1 + i:i1 + i + gs])
        else:
          idx = perm[i1 + i] if actorder else i1 + i
          scale = groups[idx // gs]
      q = quant(w, scale)
      Q1[:, i] = q
      err = (w - q) / d
      W1[:, i:] -= np.outer(err, Hinv1[i, i:])
      Err1[:, i] = err
    Q[:, i1:i2] = Q1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  if actorder:
    Q = Q[:, np.argsort(perm)]
  return Q.T


@pytest.mark.parametrize("gs,act_order", [(32, False), (32, True), (None, True)])
def test_matches_reference_transcription(gs, act_order):
  x, w, h = _calib_data(96, 40)  # K = 96: three blocks of 32 + lazy updates across them
  spec = f"int4_g{gs}" if gs else "int4"
  qw = gptq_quantize(w, h, spec, block_size=32, act_order=act_order)
  ref = _reference_gptq(w, h, bits=4, gs=gs, blocksize=32, percdamp=0.01, actorder=act_order,
                        static_groups=act_order and gs is not None)
  got = np.asarray(qw.dequantize())
  # float32 vs float64: a value within rounding of a code boundary may round the other way.
  assert np.mean(np.isclose(got, ref, rtol=1e-4, atol=1e-6)) > 0.99
  np.testing.assert_allclose(_err(x, w, got), _err(x, w, ref), rtol=1e-2)


@pytest.mark.parametrize("spec", ["int4_g128", "int4"])
def test_error_below_rtn(spec):
  x, w, h = _calib_data(256, 64)  # K = 256: two groups of 128
  rtn = _err(x, w, rtn_quantize(w, spec).dequantize())
  for act_order in (False, True):
    qw = gptq_quantize(w, h, spec, act_order=act_order)
    err = _err(x, w, qw.dequantize())
    assert err < 0.85 * rtn, (spec, act_order, err, rtn)
  # layer_error is the same quantity through H: ||X dW||^2 / n = tr(dW^T H dW) / 2.
  w_hat = np.asarray(qw.dequantize())
  np.testing.assert_allclose(layer_error(w, w_hat, h), err ** 2 / x.shape[0], rtol=1e-3)


def test_codes_in_range_ragged_and_asymmetric():
  # K = 200: not a multiple of the group (64) nor of the block (128); asymmetric zero points.
  x, w, h = _calib_data(200, 24)
  for spec, act_order in (("int4_g64_asym", False), ("int4_g64", True)):
    qw = gptq_quantize(w, h, spec, act_order=act_order)
    assert isinstance(qw, QuantizedWeight) and qw.shape == (200, 24)
    codes = np.asarray(qw.codes())
    assert codes.min() >= qw.spec.qmin and codes.max() <= qw.spec.qmax
    assert qw.scales.shape == (qw.spec.num_groups(200), 24)
    if qw.spec.bits == 4:
      assert qw.w_q[...].dtype == jnp.uint8 and qw.w_q.shape == (100, 24)
    assert _err(x, w, qw.dequantize()) < _err(x, w, rtn_quantize(w, spec).dequantize())


def test_dead_inputs_and_bad_input():
  x, w, _ = _calib_data(64, 16)
  x[:, 5] = 0.0  # an input channel that is never active
  h = 2 * x.T @ x / x.shape[0]
  qw = gptq_quantize(w, h, "int8", act_order=True)
  assert np.all(np.asarray(qw.dequantize())[5] == 0)
  with pytest.raises(QuantError, match="Hessian must be"):
    gptq_quantize(w, h[:10, :10], "int8")
  with pytest.raises(QuantError, match="NaN"):
    gptq_quantize(w, np.full_like(h, np.nan), "int8")
  with pytest.raises(QuantError, match="static_groups"):
    gptq_quantize(w, h, "int4_g32", act_order=True, static_groups=False)
  with pytest.raises(QuantError, match="multiple of the group size"):
    gptq_quantize(w, h, "int4_g32", act_order=False, block_size=48)


# Every kernel 64 x 64: one compilation of the sweep serves all layers.
_SQUARE = dict(intermediate_size=64, num_key_value_heads=4)


def test_model_transform():
  cfg = tiny_config(**_SQUARE)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16))
  stats0 = {n: s for n, s in calibrate(model, tokens).items() if n.startswith("layers.0.")}
  w = np.asarray(model.layers[0].self_attn.q_proj.kernel[...])
  errors = gptq_quantize_model(model, tokens, "int4", act_order=True)
  assert len(errors) == 14
  assert all(isinstance(lin.kernel, QuantizedWeight) for lin in linear_layers(model).values())
  assert np.all(np.isfinite(np.asarray(model(tokens))))
  # Block 0 sees the same inputs in sequential mode: GPTQ beats RTN with that layer's Hessian.
  h = stats0["layers.0.self_attn.q_proj"].hessian_KxK
  rtn = layer_error(w, rtn_quantize(w, "int4").dequantize(), h)
  assert errors["layers.0.self_attn.q_proj"] * w.shape[1] < rtn
  with pytest.raises(QuantError, match="matches no float Linear"):
    gptq_quantize_model(model, tokens, "int4")  # everything is quantized already
  fresh = Transformer(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(QuantError, match="token ids"):
    gptq_quantize_model(fresh, tokens + cfg.vocab_size, "int4")


def test_only_targets_quantized():
  cfg = tiny_config(num_hidden_layers=1, **_SQUARE)
  model = Transformer(cfg, rngs=nnx.Rngs(1))
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8))
  gptq_quantize_model(model, tokens, "int4", targets=r"mlp\.")
  quantized = {n for n, lin in linear_layers(model).items() if lin.quantized}
  assert quantized == {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"}
  quantize_model(model, "int8")  # the rest still quantizes with RTN afterwards
