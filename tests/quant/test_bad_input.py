"""Bad calibration data and compression settings: a QuantError naming the problem, never a
NaN kernel, a kernel of the wrong shape, or a trace from inside JAX / numpy."""

import numpy as np
import pytest
from flax import nnx

from postrl.models import Transformer
from postrl.quant import (QuantError, awq_clip, awq_quantize, awq_search_scale, fold_scale,
                          quantize_model, smoothing_scales)
from postrl.quant.calibrate import calibrate
from postrl.quant.gptq import gptq_quantize_model
from postrl.quant.prune import magnitude_prune, prune_model
from tests.conftest import tiny_config

W = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
H = np.eye(64, dtype=np.float32)


def _model(**over):
  return Transformer(tiny_config(**over), rngs=nnx.Rngs(0))


def _tokens(b=2, t=8):
  return np.random.default_rng(0).integers(3, 101, (b, t)).astype(np.int32)


def test_calibration_longer_than_the_model_allows():
  model = _model(max_position_embeddings=4)
  with pytest.raises(QuantError, match="max_position_embeddings=4"):
    gptq_quantize_model(model, _tokens(t=8), "int8")
  assert not any(lin.quantized for lin in _linears(model))
  # packed rows: positions restart per segment, so two segments of 4 fit
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2]] * 2, np.int32)
  calibrate(model, _tokens(t=8), segment_ids_BxT=seg)


def _linears(model):
  from postrl.quant import linear_layers  # pylint: disable=import-outside-toplevel
  return linear_layers(model).values()


@pytest.mark.parametrize("tokens, kwargs, match", [
    (None, {}, "no calibration data"),
    ([[5, 6, 7], [5, 6]], {}, "rectangular"),
    (_tokens(), dict(batch_size=1.5), "batch_size must be an integer"),
    (_tokens(), dict(keep_inputs=2.5), "keep_inputs must be an integer"),
    (_tokens(), dict(segment_ids_BxT=-np.ones((2, 8), np.int32)), "integers >= 0"),
    (_tokens(), dict(segment_ids_BxT=np.full((2, 8), 0.5)), "integers >= 0"),
])
def test_calibration_inputs(tokens, kwargs, match):
  with pytest.raises(QuantError, match=match):
    calibrate(_model(), tokens, **kwargs)


@pytest.mark.parametrize("n_grid", [0, 2.5])
def test_awq_grid(n_grid):
  # awq_clip(n_grid=0) divided by zero: a kernel of NaN, silently
  with pytest.raises(QuantError, match="n_grid must be an integer"):
    awq_clip(W, H, "int8", n_grid=n_grid)
  with pytest.raises(QuantError, match="n_grid must be an integer"):
    awq_search_scale(W, H, np.ones(64), "int8", n_grid=n_grid)


@pytest.mark.parametrize("call, match", [
    (lambda: awq_search_scale(W, np.eye(10), np.ones(64), "int8"), r"Hessian must be \[64, 64\]"),
    (lambda: awq_search_scale(W, H, np.ones(10), "int8"), "one activation scale per input"),
    (lambda: awq_clip(W, np.eye(10), "int8"), r"Hessian must be \[64, 64\]"),
    # a 1-D kernel was broadcast against the scales into an [8, 8] "quantized" kernel
    (lambda: awq_quantize(np.ones(8), np.eye(8), np.ones(8), "int8"), "must be 2-D"),
    (lambda: smoothing_scales(np.ones(10), W), "shape"),
    (lambda: fold_scale(_model(), 5, "qkv", np.ones(64)), r"block_index must be in \[0, 2\)"),
    (lambda: fold_scale(_model(), 0, "qkv", np.ones(10)), r"one value per input channel \(64\)"),
    (lambda: magnitude_prune(np.ones(8, np.float32), sparsity=0.5), "2-D kernel"),
    (lambda: quantize_model(_model(), "int8", targets=None), "not a valid regex"),
])
def test_shapes_and_arguments(call, match):
  with pytest.raises(QuantError, match=match):
    call()


def test_numpy_sparsity_is_a_number():
  w = np.asarray(magnitude_prune(W, sparsity=np.float32(0.5)))
  assert np.sum(w == 0) == W.size // 2
  prune_model(_model(), "magnitude", sparsity=np.float32(0.5))
