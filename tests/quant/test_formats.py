"""Quantized storage: error bounds, golden codes, packing order, group layout, nbytes, bad input."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postrl.quant import formats as F
from postrl.quant.formats import QuantError, QuantizedWeight, QuantSpec

RNG = np.random.default_rng(0)

RTN_SPECS = [QuantSpec(8), QuantSpec(8, 32), QuantSpec(4), QuantSpec(4, 64), QuantSpec(4, 128),
             QuantSpec(8, symmetric=False), QuantSpec(4, 32, symmetric=False)]


def _w(k=256, n=48, seed=0):
  return np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)


def _rows(a_GxN, k, g):
  return np.repeat(np.asarray(a_GxN), k if g is None else g, axis=0)[:k]


# ------------------------------------------------------------------------------ NF4 levels


def test_nf4_levels_are_qlora_normal_quantiles():
  """QLoRA §3: 8 positive / 7 negative quantiles of N(0,1) at linspace(0.9677083, 0.5), an exact
  zero, divided by the largest (bitsandbytes create_normal_map)."""
  nd, off = NormalDist(), 0.9677083
  pos = [nd.inv_cdf(p) for p in np.linspace(off, 0.5, 9)[:-1]]
  neg = [-nd.inv_cdf(p) for p in np.linspace(off, 0.5, 8)[:-1]]
  levels = np.sort(np.array(pos + [0.0] + neg))
  levels /= levels.max()
  np.testing.assert_allclose(F.NF4_LEVELS, levels, atol=1e-6)
  assert F.NF4_LEVELS[7] == 0.0 and F.NF4_LEVELS[0] == -1.0 and F.NF4_LEVELS[-1] == 1.0


# ------------------------------------------------------------------------------ golden values


def test_symmetric_int8_golden():
  """s = absmax / 127 per output column; q = round(w / s) (half to even)."""
  w = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
  spec = QuantSpec(8)
  scales, zeros = F.quant_params(w, spec)
  assert zeros is None
  np.testing.assert_allclose(scales, [[1.0 / 127, 4.0 / 127]], rtol=1e-7)
  codes = F.quantize_codes(w, scales, zeros, spec)
  np.testing.assert_array_equal(codes, [[127, -64], [64, 127]])  # 63.5 -> 64, -63.5 -> -64


def test_asymmetric_int4_golden_zero_point():
  """s = (max - min) / 15, z = -8 - round(min / s), q = round(w / s) + z, ŵ = s (q - z).

  Column [0, 1, 3]: s = 0.2, z = -8, codes -8, -3, 7. Column [-1, -1.6, -4]: s = 0.2, z = 12,
  codes 7, 4, -8 (max -> qmax, min -> qmin).
  """
  w = np.array([[0.0, -1.0], [1.0, -1.6], [3.0, -4.0]], np.float32)
  spec = QuantSpec(4, symmetric=False)
  scales, zeros = F.quant_params(w, spec)
  np.testing.assert_allclose(scales, [[0.2, 0.2]], rtol=1e-6)
  np.testing.assert_array_equal(zeros, [[-8.0, 12.0]])
  codes = F.quantize_codes(w, scales, zeros, spec)
  np.testing.assert_array_equal(codes, [[-8, 7], [-3, 4], [7, -8]])
  np.testing.assert_allclose(F.dequantize_codes(codes, scales, zeros, spec), w, atol=1e-6)


def test_nf4_levels_reproduced_exactly_and_codes_index_levels():
  """A weight made of the levels times its absmax is stored without error, codes = i - 8."""
  levels = np.asarray(F.NF4_LEVELS, np.float32)
  w = np.tile(levels[:, None] * np.array([[2.0, 0.5]], np.float32), (4, 1))  # K = 64
  spec = QuantSpec(4, 64, kind="nf4")
  scales, _ = F.quant_params(w, spec)
  np.testing.assert_allclose(scales, [[2.0, 0.5]])
  codes = np.asarray(F.quantize_codes(w, scales, None, spec))
  np.testing.assert_array_equal(codes[:16, 0], np.arange(16) - 8)
  np.testing.assert_allclose(F.dequantize_codes(codes, scales, None, spec), w, rtol=1e-6)


# ------------------------------------------------------------------------------ error bounds


@pytest.mark.parametrize("spec", RTN_SPECS, ids=lambda s: s.name)
def test_rtn_error_within_half_a_step(spec):
  """|w - ŵ| <= s / 2 per element, and codes stay in [qmin, qmax]."""
  w = _w()
  qw = QuantizedWeight.quantize(w, spec)
  err = np.abs(np.asarray(qw.dequantize()) - w)
  s_KxN = _rows(qw.scale_values(), w.shape[0], spec.group_size)
  assert np.all(err <= s_KxN / 2 * (1 + 1e-5) + 1e-7)
  codes = np.asarray(qw.codes())
  assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
  # the bound is tight-ish: RTN is not accidentally exact or coarser
  assert err.max() > 0.3 * s_KxN.min()


def test_nf4_error_within_half_the_largest_level_gap():
  w = _w(256, 40, seed=1)
  spec = QuantSpec(4, 64, kind="nf4")
  qw = QuantizedWeight.quantize(w, spec)
  err = np.abs(np.asarray(qw.dequantize()) - w)
  absmax = _rows(np.abs(w).reshape(4, 64, 40).max(axis=1), 256, 64)
  half_gap = np.max(np.diff(F.NF4_LEVELS)) / 2
  assert np.all(err <= absmax * half_gap * (1 + 1e-5))
  # nearest level: no other level is closer
  x = (w / absmax)[..., None]
  best = np.min(np.abs(x - np.asarray(F.NF4_LEVELS)), axis=-1)
  np.testing.assert_allclose(err / absmax, best, atol=1e-6)


def test_nf4_double_quant_scales_and_weight_bound():
  """Scales double-quantized to int8 (block 256 along N, mean-centred): |c - ĉ| <= c1 / 2."""
  w = _w(128, 300, seed=2) * np.linspace(0.5, 2.0, 300, dtype=np.float32)
  spec = QuantSpec(4, 64, kind="nf4", double_quant=True)
  qw = QuantizedWeight.quantize(w, spec)
  assert qw.scales[...].dtype == jnp.int8 and qw.scales2[...].shape == (2, 2)
  true = np.abs(w).reshape(2, 64, 300).max(axis=1)
  c1 = np.repeat(np.asarray(qw.scales2[...]), 256, axis=1)[:, :300]
  got = np.asarray(qw.scale_values())
  assert np.all(np.abs(got - true) <= c1 / 2 + 1e-6)
  np.testing.assert_allclose(float(qw.scales_offset[...]), true.mean(), rtol=1e-6)
  # weight error: NF4 bound at the stored scale plus the scale error times |l| <= 1
  err = np.abs(np.asarray(qw.dequantize()) - w)
  half_gap = np.max(np.diff(F.NF4_LEVELS)) / 2
  bound = _rows(got, 128, 64) * half_gap + _rows(np.abs(got - true), 128, 64)
  assert np.all(err <= bound * (1 + 1e-5) + 1e-6)


# ------------------------------------------------------------------------------ layout


def test_scales_are_per_output_column_and_per_group_along_k():
  """scales[j, n] = absmax(w[j g:(j+1) g, n]) / qmax: catches a transposed or wrong group axis."""
  w = _w(96, 8) * (10.0 ** np.arange(8, dtype=np.float32) / 1e4)
  w[40] *= 100.0  # an outlier row in group 1 (g = 32)
  scales, _ = F.quant_params(w, QuantSpec(8, 32))
  np.testing.assert_allclose(scales, np.abs(w).reshape(3, 32, 8).max(axis=1) / 127, rtol=1e-6)
  pc, _ = F.quant_params(w, QuantSpec(8))
  np.testing.assert_allclose(pc, np.abs(w).max(axis=0, keepdims=True) / 127, rtol=1e-6)


def test_ragged_k_pads_the_last_group_with_edge_rows():
  """K = 100, g = 32: 4 groups, the last of 4 rows; same as edge-padding K to 128 (zero padding
  would move the min of these all-positive weights)."""
  w = _w(100, 16, seed=3) + 4.0
  for spec in (QuantSpec(4, 32), QuantSpec(4, 32, symmetric=False), QuantSpec(4, 32, kind="nf4")):
    qw = QuantizedWeight.quantize(w, spec)
    assert qw.scales[...].shape == (4, 16) and qw.w_q[...].shape == (50, 16)
    padded = QuantizedWeight.quantize(np.pad(w, ((0, 28), (0, 0)), mode="edge"), spec)
    np.testing.assert_array_equal(qw.scales[...], padded.scales[...])
    np.testing.assert_array_equal(qw.codes(), padded.codes()[:100])
    np.testing.assert_allclose(qw.dequantize(), padded.dequantize()[:100])
  last = np.abs(w[96:]).max(axis=0) / 7
  np.testing.assert_allclose(F.quant_params(w, QuantSpec(4, 32))[0][3], last, rtol=1e-6)


def test_group_larger_than_k_is_one_group():
  w = _w(24, 8)
  a = QuantizedWeight.quantize(w, QuantSpec(4, 128))
  b = QuantizedWeight.quantize(w, QuantSpec(4))
  np.testing.assert_array_equal(a.scales[...], b.scales[...])


# ------------------------------------------------------------------------------ packing


def test_pack_int4_byte_layout_low_nibble_is_even_row():
  codes = np.array([[1, -1, 7], [2, 0, -8]], np.int8)
  packed = np.asarray(F.pack_int4(codes))
  assert packed.dtype == np.uint8 and packed.shape == (1, 3)
  np.testing.assert_array_equal(packed, [[0x21, 0x0F, 0x87]])


@pytest.mark.parametrize("k", [64, 33, 1])
def test_pack_unpack_round_trip(k):
  codes = RNG.integers(-8, 8, size=(k, 5)).astype(np.int8)
  packed = F.pack_int4(codes)
  assert packed.shape == (-(-k // 2), 5)
  np.testing.assert_array_equal(F.unpack_int4(packed, k), codes)
  if k % 2:  # the padding nibble of the last byte is 0
    assert np.all(np.asarray(packed[-1]) >> 4 == 0)


def test_odd_k_int4_weight_round_trip():
  w = _w(33, 7)
  qw = QuantizedWeight.quantize(w, QuantSpec(4, 16))
  assert qw.w_q[...].shape == (17, 7)
  direct = F.dequantize_codes(*(lambda s, z: (F.quantize_codes(w, s, z, qw.spec), s, z))(
      *F.quant_params(w, qw.spec)), qw.spec)
  np.testing.assert_array_equal(qw.dequantize(), direct)


# ------------------------------------------------------------------------------ quality


def test_asymmetric_beats_symmetric_on_a_shifted_distribution():
  w = np.random.default_rng(4).uniform(1.0, 2.0, size=(128, 32)).astype(np.float32)
  for bits in (8, 4):
    sym = QuantizedWeight.quantize(w, QuantSpec(bits, 32)).dequantize()
    asym = QuantizedWeight.quantize(w, QuantSpec(bits, 32, symmetric=False)).dequantize()
    mse_sym, mse_asym = np.mean((sym - w) ** 2), np.mean((asym - w) ** 2)
    assert mse_asym < mse_sym / 3, (bits, mse_sym, mse_asym)


def test_group_wise_beats_per_channel_with_outlier_rows():
  w = _w(512, 32, seed=5)
  w[[3, 200, 401]] *= 30.0  # outlier input channels (rows of K)
  pc = QuantizedWeight.quantize(w, QuantSpec(4)).dequantize()
  gw = QuantizedWeight.quantize(w, QuantSpec(4, 64)).dequantize()
  normal = np.ones(512, bool)
  normal[[3, 200, 401]] = False
  assert np.mean((gw - w)[normal] ** 2) < np.mean((pc - w)[normal] ** 2) / 4


# ------------------------------------------------------------------------------ storage


def test_nbytes_int4_g128_is_an_eighth_of_float32_plus_scales():
  K, N = 1024, 256
  w = _w(K, N)
  qw = QuantizedWeight.quantize(w, QuantSpec(4, 128))
  assert qw.w_q[...].dtype == jnp.uint8 and qw.w_q[...].shape == (K // 2, N)
  assert qw.nbytes == K * N // 2 + 4 * (K // 128) * N
  assert qw.nbytes / w.nbytes == pytest.approx(1 / 8 + 1 / 128)
  q8 = QuantizedWeight.quantize(w, QuantSpec(8))
  assert q8.nbytes == K * N + 4 * N
  nf4 = QuantizedWeight.quantize(w, "nf4_dq")
  # 4 bits + 8/64 bits + 32/(64*256) bits per weight + the offset
  assert nf4.nbytes == K * N // 2 + (K // 64) * N + 4 * (K // 64) * 1 + 4


def test_quantized_dot_equals_matmul_with_dequantised_weight():
  w, x = _w(64, 24), RNG.normal(size=(3, 5, 64)).astype(np.float32)
  for spec in ("int8", "int4_g32_asym", "nf4_dq"):
    qw = QuantizedWeight.quantize(w, spec)
    np.testing.assert_allclose(F.quantized_dot(jnp.asarray(x), qw), x @ np.asarray(qw.dequantize()),
                               rtol=1e-5, atol=1e-5)
    y16 = F.quantized_dot(jnp.asarray(x, jnp.bfloat16), qw)
    assert y16.dtype == jnp.bfloat16 and y16.shape == (3, 5, 24)


def test_from_codes_stores_external_codes():
  """The entry point for GPTQ / AWQ: codes + scales in, packed storage out."""
  w = _w(64, 16)
  spec = QuantSpec(4, 32, symmetric=False)
  s, z = F.quant_params(w, spec)
  codes = F.quantize_codes(w, s, z, spec)
  qw = QuantizedWeight.from_codes(codes, s, z, spec, names=("embed", "mlp"))
  np.testing.assert_array_equal(qw.codes(), codes)
  assert qw.w_q.get_metadata()["out_sharding"] == ("embed", "mlp")
  renamed = qw.with_names(("mlp", None))
  assert renamed.scales.get_metadata()["out_sharding"] == ("mlp", None)
  np.testing.assert_array_equal(renamed.dequantize(), qw.dequantize())


def test_quantize_under_jit():
  spec = QuantSpec(4, 32)
  f = jax.jit(lambda w: QuantizedWeight.quantize(w, spec).dequantize())
  w = _w(64, 8)
  np.testing.assert_array_equal(f(w), QuantizedWeight.quantize(w, spec).dequantize())


# ------------------------------------------------------------------------------ specs and errors


@pytest.mark.parametrize("name", ["int8", "int8_asym", "int4_g128", "int4_g32_asym", "nf4_g64",
                                  "nf4_g64_dq", "int4_g128_dq"])
def test_parse_spec_round_trip(name):
  assert F.parse_spec(name).name == name


def test_parse_spec_defaults():
  assert F.parse_spec("nf4") == F.NF4 and F.parse_spec("nf4_dq") == F.NF4_DQ
  assert F.parse_spec("int4_g128") == F.INT4_G128


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), "bits must be 8 or 4"),
    (dict(group_size=0), "group_size must be a positive int"),
    (dict(group_size=32.0), "group_size must be a positive int"),
    (dict(kind="fp4", bits=4), "kind must be 'int' or 'nf4'"),
    (dict(kind="nf4", bits=8), "4-bit and symmetric"),
    (dict(bits=4, symmetric=False, double_quant=True), "double_quant needs symmetric"),
])
def test_bad_spec(kwargs, match):
  with pytest.raises(QuantError, match=match):
    QuantSpec(**kwargs)


def test_bad_spec_name():
  with pytest.raises(QuantError, match="unknown quantization spec 'int3'"):
    F.parse_spec("int3")


def test_bad_weights_name_the_layer():
  w = _w(8, 4)
  w[2, 1] = np.nan
  with pytest.raises(QuantError, match="layers.0.mlp.up_proj: kernel .* NaN"):
    QuantizedWeight.quantize(w, "int8", name="layers.0.mlp.up_proj")
  with pytest.raises(QuantError, match="layers.1.q: can only quantize a 2-D kernel"):
    QuantizedWeight.quantize(np.ones((2, 3, 4), np.float32), "int8", name="layers.1.q")
  with pytest.raises(QuantError, match=r"gptq.layer: scales of int4_g32 .* must be \[2, 4\]"):
    QuantizedWeight.from_codes(np.zeros((64, 4), np.int8), np.ones((1, 4), np.float32), None,
                               QuantSpec(4, 32), name="gptq.layer")
  with pytest.raises(QuantError, match="zeros must be"):
    QuantizedWeight.from_codes(np.zeros((64, 4), np.int8), np.ones((1, 4), np.float32), None,
                               QuantSpec(8, symmetric=False))
  with pytest.raises(QuantError, match="unpack_int4: 3 packed rows hold 5 or 6 codes, not 8"):
    F.unpack_int4(np.zeros((3, 2), np.uint8), 8)
