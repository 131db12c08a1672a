"""postrl.quant.formats on input that does not fit the format: refused with the layer / field
named, never stored or multiplied silently wrong."""

import jax.numpy as jnp
import numpy as np
import pytest

from postrl.quant import QuantError, QuantizedWeight, QuantSpec, quantized_dot


def _w(k, n, seed=0):
  return np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)


@pytest.mark.parametrize("spec,code", [(QuantSpec(4, 32), 9), (QuantSpec(4, 32), -9),
                                       (QuantSpec(8), 200), (QuantSpec(8), -129)])
def test_from_codes_refuses_codes_the_storage_cannot_hold(spec, code):
  # int4 kept the low nibble (9 was stored as -7) and int8 wrapped (200 as -56), silently
  codes = np.full((64, 8), code, np.int32)
  scales = np.ones((spec.num_groups(64), 8), np.float32)
  lo, hi = (-8, 7) if spec.bits == 4 else (-128, 127)
  with pytest.raises(QuantError,
                     match=rf"gptq\.l: codes of {spec.name} must lie in \[{lo}, {hi}\]"):
    QuantizedWeight.from_codes(codes, scales, None, spec, name="gptq.l")
  # the ends of the range are stored as they are
  edge = np.where(np.arange(64)[:, None] % 2 == 0, lo, hi) * np.ones((1, 8), np.int32)
  np.testing.assert_array_equal(QuantizedWeight.from_codes(edge, scales, None, spec).codes(), edge)


def test_from_codes_refuses_fractional_float_codes_and_takes_whole_ones():
  # 2.7 was truncated to 2
  with pytest.raises(QuantError, match="codes of int8 must be integers, got float32"):
    QuantizedWeight.from_codes(np.full((64, 8), 2.7, np.float32), np.ones((1, 8), np.float32))
  # rounded codes handed over as floats (another library's output) are stored exactly
  whole = np.full((64, 8), -3.0, np.float32)
  np.testing.assert_array_equal(
      QuantizedWeight.from_codes(whole, np.ones((1, 8), np.float32)).codes(), whole.astype(int))


@pytest.mark.parametrize("spec", ["int8", "int4_g32_asym", "nf4"])
def test_quantized_dot_names_a_wrong_k_or_an_integer_x(spec):
  qw = QuantizedWeight.quantize(_w(64, 16), spec)
  # NF4 failed inside dot_general; int8 / int4 named w_q's rows instead of the layer's K
  with pytest.raises(QuantError, match=rf"quantized_dot: x must be \[..., K\] with K=64 for the "
                                       rf"{qw.spec.name} kernel of shape \[64, 16\], got shape "
                                       r"\(2, 48\)"):
    quantized_dot(jnp.ones((2, 48)), qw)
  # an integer x got an integer-rounded kernel and an integer result
  with pytest.raises(QuantError, match="x must be floating point .* got int32"):
    quantized_dot(jnp.ones((2, 64), jnp.int32), qw)
  x = jnp.asarray(_w(3, 64, seed=1))
  np.testing.assert_allclose(quantized_dot(x, qw), x @ qw.dequantize(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 16), (64, 0)])
def test_empty_kernel_is_refused(shape):
  # used to raise ZeroDivisionError from the group reshape
  with pytest.raises(QuantError, match=r"layers\.0\.q_proj: cannot quantize an empty kernel"):
    QuantizedWeight.quantize(np.zeros(shape, np.float32), "int4_g32", name="layers.0.q_proj")
