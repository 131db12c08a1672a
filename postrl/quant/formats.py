"""Quantized weight storage: the ONE definition every quantizer (RTN, GPTQ, AWQ, NF4/QLoRA) writes
and every quantized matmul (``quantized_dot`` -> ``kernels.quantized_matmul``) reads.

Layout. A kernel W is stored ``[K, N]`` (in, out; ``y = x W``) as in ``postrl.models.Linear``.
Quantization groups run along K, the reduction axis: with group size g, group ``G_j`` holds rows
``[j g, (j + 1) g)`` and each (group, output column) pair has its own scale (and zero point):

    scales_GxN, zeros_GxN       G = ceil(K / g);   group_size=None: G = 1 (per output channel)
    codes_KxN                   int8 (int4 codes live in int8 until packed)

K not divisible by g: the last group is shorter (K mod g rows). This is the same as padding the
group with copies of its last row (``np.pad(mode="edge")``), which change neither its absmax nor its
min / max, so no error is raised and the padding takes no storage. Odd K with int4: the packed
array has ceil(K/2) rows and the unused high nibble of the last byte is 0.

Formats (s = scale, z = zero point, [.] = round half to even, clip to the code range):

* symmetric int, absmax (LLM.int8(), Dettmers et al. 2022, §2.1 "Absmax quantization"; QLoRA,
  Dettmers et al. 2023, Eq. 1: ``X_int8 = round(127 / absmax(X) · X)``)::

      qmax = 2^(b-1) - 1 (127 or 7),   s = absmax(W_group) / qmax
      q = clip([w / s], -qmax, qmax),   ŵ = s q,   |w - ŵ| <= s / 2

* asymmetric int, min/max with an integer zero point (zeropoint quantization, LLM.int8() §2.1;
  Jacob et al. 2018 "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
  Only Inference"). Codes use the signed range so int8 and packed int4 nibbles hold them::

      qmin = -2^(b-1),  qmax = 2^(b-1) - 1,   s = (max - min) / (2^b - 1),   z = qmin - [min / s]
      q = clip([w / s] + z, qmin, qmax),   ŵ = s (q - z),   |w - ŵ| <= s / 2

  The range is the group's own [min, max] (not widened to contain 0). A constant group
  (max == min) gets s = |min| (or 1 when it is 0), so it is reproduced exactly.

* NF4, 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, §3 "4-bit NormalFloat Quantization"): 16
  levels l_i, the quantiles of N(0, 1) normalised to [-1, 1] with an exact 0, ``NF4_LEVELS`` (the
  bitsandbytes table, QLoRA Appendix E); absmax per block of 64 along K::

      s = absmax(W_block),   q = argmin_i |w / s - l_i|,   ŵ = s l_q,
      |w - ŵ| <= s · max_i (l_{i+1} - l_i) / 2

  NF4 codes are stored as ``i - 8`` in [-8, 7] so that every int4 format packs the same way.

* double quantization of the scales (QLoRA §3 "Double Quantization"): the float32 block constants
  c2 are quantized a second time, after subtracting their mean (they are positive; centring lets a
  symmetric code use the whole range)::

      μ = mean(c2),   c1 = absmax(c2 - μ over a block of 256) / 127,   c2_q = [(c2 - μ) / c1]
      ĉ2 = c1 c2_q + μ,   |c2 - ĉ2| <= c1 / 2

  QLoRA quantizes c2 to "8-bit Floats" and bitsandbytes uses its dynamic 8-bit map; here the
  second level is linear int8 absmax, which has the same storage (8 bits + 32/256 bits per
  constant: 0.127 bits per weight at block 64) and a closed-form error bound. Blocks of 256 run
  along N (the constants of one group row), the last one shorter when 256 does not divide N.

(Sources: the survey's Eq. 23 (seed 003 §6.1.1) is this absmax formula, but its reference [201],
QLoRA, is mis-cited there as "SpQR"; the formulas here follow the original papers, LLM.int8()
(Dettmers et al. 2022) and QLoRA (Dettmers et al. 2023), not the survey.)

Packing int4 (``pack_int4``): rows 2i and 2i+1 share byte i, low nibble = row 2i, as two's-
complement nibbles; ``unpack_int4`` sign-extends. The packed array is what is stored, so
``QuantizedWeight.nbytes`` is K N / 2 bytes for int4 (plus 4 G N for the scales).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postrl.models.config import ConfigError


class QuantError(ConfigError):
  """A quantization request that cannot be carried out; the message names the layer or field."""


# QLoRA Appendix E / bitsandbytes ``create_normal_map(offset=0.9677083)``: quantiles of N(0, 1)
# (8 positive, 7 negative, an exact 0) divided by the largest. Reproduced in tests from
# ``statistics.NormalDist`` to 1e-6.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0)
NF4_BLOCK = 64  # QLoRA's block size for the first-level absmax constants
DOUBLE_QUANT_BLOCK = 256  # QLoRA's block size for the second-level constants
_NF4_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(NF4_LEVELS[:-1], NF4_LEVELS[1:]))


# ------------------------------------------------------------------------------------ spec


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How a weight is quantized (hashable: it is static in the model's graph).

  Attributes:
    bits: 8 or 4 (4-bit codes are packed two per byte).
    group_size: rows of K per scale; None = one scale per output channel (a group of all K).
    symmetric: absmax (zero point 0) or min/max with a zero point. NF4 is symmetric.
    kind: "int" (uniform levels) or "nf4" (QLoRA's NormalFloat levels, 4 bits).
    double_quant: quantize the scales again to int8 in blocks of 256 (QLoRA); symmetric only.
  """
  bits: int = 8
  group_size: int | None = None
  symmetric: bool = True
  kind: str = "int"
  double_quant: bool = False

  def __post_init__(self):
    if self.kind not in ("int", "nf4"):
      raise QuantError(f"QuantSpec.kind must be 'int' or 'nf4', got {self.kind!r}")
    if self.bits not in (4, 8):
      raise QuantError(f"QuantSpec.bits must be 8 or 4, got {self.bits!r}")
    if self.kind == "nf4" and (self.bits != 4 or not self.symmetric):
      raise QuantError(f"QuantSpec(kind='nf4') is 4-bit and symmetric (absmax), got bits="
                       f"{self.bits}, symmetric={self.symmetric}")
    if self.group_size is not None and (
        isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer))
        or self.group_size < 1):
      raise QuantError(f"QuantSpec.group_size must be a positive int or None (per output channel), "
                       f"got {self.group_size!r}")
    if self.double_quant and not self.symmetric:
      raise QuantError("QuantSpec.double_quant needs symmetric=True (it quantizes absmax scales; "
                       "QLoRA uses it with NF4)")

  @property
  def qmax(self) -> int:
    """Largest code: 127 / 7 (also for NF4 the largest stored code, 7)."""
    return 2 ** (self.bits - 1) - 1

  @property
  def qmin(self) -> int:
    """Smallest code: -qmax when symmetric int (LLM.int8() drops -128), else -2^(b-1)."""
    return -self.qmax if (self.symmetric and self.kind == "int") else -2 ** (self.bits - 1)

  @property
  def packed(self) -> bool:
    """Whether codes are stored two per byte."""
    return self.bits == 4

  @property
  def name(self) -> str:
    """Short name, inverse of ``parse_spec``: int8, int4_g128, int4_g128_asym, nf4_g64_dq."""
    out = "nf4" if self.kind == "nf4" else f"int{self.bits}"
    if self.group_size is not None:
      out += f"_g{self.group_size}"
    if not self.symmetric:
      out += "_asym"
    if self.double_quant:
      out += "_dq"
    return out

  def num_groups(self, k: int) -> int:
    """G = ceil(K / group_size), 1 per output channel."""
    return 1 if self.group_size is None else -(-k // self.group_size)


INT8 = QuantSpec(bits=8)
INT4_G128 = QuantSpec(bits=4, group_size=128)
NF4 = QuantSpec(bits=4, group_size=NF4_BLOCK, kind="nf4")
NF4_DQ = QuantSpec(bits=4, group_size=NF4_BLOCK, kind="nf4", double_quant=True)

_SPEC_RE = re.compile(r"(int8|int4|nf4)(?:_g(\d+))?(_asym)?(_dq)?")


def parse_spec(spec: "QuantSpec | str") -> QuantSpec:
  """``"int8"``, ``"int4_g128"``, ``"int8_g64_asym"``, ``"nf4"`` (= nf4_g64), ``"nf4_dq"`` ->
  QuantSpec; a QuantSpec passes through. For config files and command lines."""
  if isinstance(spec, QuantSpec):
    return spec
  m = _SPEC_RE.fullmatch(str(spec))
  if m is None:
    raise QuantError(f"unknown quantization spec {spec!r}; expected e.g. int8, int8_asym, "
                     f"int4_g128, int4_g128_asym, nf4, nf4_dq "
                     f"(format: int8|int4|nf4[_g<size>][_asym][_dq])")
  fmt, group, asym, dq = m.groups()
  group = int(group) if group else (NF4_BLOCK if fmt == "nf4" else None)
  return QuantSpec(bits=8 if fmt == "int8" else 4, group_size=group, symmetric=not asym,
                   kind="nf4" if fmt == "nf4" else "int", double_quant=bool(dq))


# ---------------------------------------------------------------------------- group helpers


def _group_rows(w_KxN, group_size):
  """[K, N] -> [G, g, N], the last group padded with copies of its last row (edge padding)."""
  K, N = w_KxN.shape
  g = K if group_size is None else group_size
  G = -(-K // g)
  if G * g != K:
    w_KxN = jnp.pad(w_KxN, ((0, G * g - K), (0, 0)), mode="edge")
  return w_KxN.reshape(G, g, N)


def expand_groups(a_GxN, k: int, group_size: int | None):
  """Per-group values [G, N] -> per-row [K, N] (row r gets group r // g)."""
  if group_size is None:
    return jnp.broadcast_to(a_GxN, (k, a_GxN.shape[1]))
  return jnp.repeat(a_GxN, group_size, axis=0, total_repeat_length=a_GxN.shape[0] * group_size)[:k]


def _safe(s):
  return jnp.where(s > 0, s, 1.0)


def _check_2d(w, name):
  if getattr(w, "ndim", None) != 2:
    raise QuantError(f"{name}: can only quantize a 2-D kernel [K, N], got shape "
                     f"{tuple(getattr(w, 'shape', ()))}")
  if 0 in w.shape:
    raise QuantError(f"{name}: cannot quantize an empty kernel of shape {tuple(w.shape)}")


# ---------------------------------------------------------------------------- quantization


def quant_params(w_KxN, spec: QuantSpec):
  """Scales (and zero points) of round-to-nearest quantization, per group along K.

  symmetric int: s = absmax / qmax (LLM.int8() §2.1; QLoRA Eq. 1); NF4: s = absmax (QLoRA §3);
  asymmetric: s = (max - min) / (2^b - 1), z = qmin - round(min / s) (see the module docstring).

  Args:
    w_KxN: float weight, [in, out].
    spec: the format.
  Returns:
    (scales_GxN float32, zeros_GxN float32 or None when symmetric), G = spec.num_groups(K).
  """
  _check_2d(w_KxN, "weight")
  wg = _group_rows(jnp.asarray(w_KxN, jnp.float32), spec.group_size)
  if spec.symmetric:
    absmax = jnp.max(jnp.abs(wg), axis=1)
    return (absmax if spec.kind == "nf4" else absmax / spec.qmax), None
  lo, hi = jnp.min(wg, axis=1), jnp.max(wg, axis=1)
  constant_scale = jnp.where(lo != 0, jnp.abs(lo), 1.0)
  scales = jnp.where(hi > lo, (hi - lo) / (2 ** spec.bits - 1), constant_scale)
  zeros = spec.qmin - jnp.round(lo / scales)
  return scales, zeros


def quantize_codes(w_KxN, scales_GxN, zeros_GxN, spec: QuantSpec):
  """Round-to-nearest codes, int8 [K, N] (unpacked; int4 and NF4 codes in [-8, 7]).

  int: q = clip(round(w / s) + z, qmin, qmax) (z = 0 when symmetric);
  NF4: q = argmin_i |w / s - l_i| - 8 (nearest level; ties go to the lower level).
  """
  _check_2d(w_KxN, "weight")
  K = w_KxN.shape[0]
  w = jnp.asarray(w_KxN, jnp.float32)
  s = _safe(expand_groups(jnp.asarray(scales_GxN, jnp.float32), K, spec.group_size))
  if spec.kind == "nf4":
    idx = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS, jnp.float32), w / s, side="left")
    return (idx - 8).astype(jnp.int8)
  q = jnp.round(w / s)
  if zeros_GxN is not None:
    q = q + expand_groups(jnp.asarray(zeros_GxN, jnp.float32), K, spec.group_size)
  return jnp.clip(q, spec.qmin, spec.qmax).astype(jnp.int8)


def dequantize_codes(codes_KxN, scales_GxN, zeros_GxN, spec: QuantSpec):
  """Codes -> float32 [K, N]: ŵ = s (q - z) for int, ŵ = s l_{q+8} for NF4."""
  K = codes_KxN.shape[0]
  s = expand_groups(jnp.asarray(scales_GxN, jnp.float32), K, spec.group_size)
  if spec.kind == "nf4":
    levels = jnp.asarray(NF4_LEVELS, jnp.float32)
    return jnp.take(levels, codes_KxN.astype(jnp.int32) + 8, axis=0) * s
  q = codes_KxN.astype(jnp.float32)
  if zeros_GxN is not None:
    q = q - expand_groups(jnp.asarray(zeros_GxN, jnp.float32), K, spec.group_size)
  return q * s


def pack_int4(codes_KxN):
  """int4 codes in [-8, 7] -> uint8 [ceil(K/2), N]: byte i = (row 2i & 0xF) | (row 2i+1 & 0xF) << 4.

  Odd K: a zero row is appended (high nibble of the last byte = 0).
  """
  K, N = codes_KxN.shape
  c = jnp.asarray(codes_KxN).astype(jnp.uint8) & jnp.uint8(0xF)  # two's-complement nibble
  if K % 2:
    c = jnp.concatenate([c, jnp.zeros((1, N), jnp.uint8)], axis=0)
  pairs = c.reshape(-1, 2, N)
  return pairs[:, 0] | (pairs[:, 1] << jnp.uint8(4))


def unpack_int4(packed, k: int | None = None):
  """uint8 [R, N] -> int8 codes [k, N] (default k = 2R), sign-extending each nibble."""
  packed = jnp.asarray(packed, jnp.uint8)
  R, N = packed.shape
  k = 2 * R if k is None else k
  if not 2 * R - 1 <= k <= 2 * R:
    raise QuantError(f"unpack_int4: {R} packed rows hold {2 * R - 1} or {2 * R} codes, not {k}")
  nibbles = jnp.stack([packed & jnp.uint8(0xF), packed >> jnp.uint8(4)], axis=1).astype(jnp.int8)
  codes = jnp.where(nibbles >= 8, nibbles - 16, nibbles).astype(jnp.int8)
  return codes.reshape(2 * R, N)[:k]


def double_quantize(scales_GxN, *, block: int = DOUBLE_QUANT_BLOCK):
  """QLoRA double quantization of positive scales (module docstring): mean-centred int8 absmax
  in blocks of ``block`` along N.

  Returns:
    (codes_GxN int8, scales2_GxB float32 with B = ceil(N / block), offset float32 scalar).
  """
  c = jnp.asarray(scales_GxN, jnp.float32)
  G, N = c.shape
  offset = jnp.mean(c)
  nb = -(-N // block)
  centred = jnp.pad(c - offset, ((0, 0), (0, nb * block - N)))  # zeros never raise an absmax
  s2 = jnp.max(jnp.abs(centred.reshape(G, nb, block)), axis=-1) / 127.0
  s2_full = jnp.repeat(_safe(s2), block, axis=1)[:, :N]
  codes = jnp.clip(jnp.round((c - offset) / s2_full), -127, 127).astype(jnp.int8)
  return codes, s2, offset


def double_dequantize(codes_GxN, scales2_GxB, offset, *, block: int = DOUBLE_QUANT_BLOCK):
  """ĉ2 = c1 c2_q + μ (inverse of ``double_quantize`` with the same ``block``)."""
  N = codes_GxN.shape[1]
  s2 = jnp.repeat(scales2_GxB, block, axis=1, total_repeat_length=scales2_GxB.shape[1] * block)
  return codes_GxN.astype(jnp.float32) * s2[:, :N] + offset


def _rtn_impl(w_KxN, spec):
  scales, zeros = quant_params(w_KxN, spec)
  return quantize_codes(w_KxN, scales, zeros, spec), scales, zeros


_rtn = jax.jit(_rtn_impl, static_argnums=1)


# ---------------------------------------------------------------------------- storage


class QuantStorage(nnx.Variable):
  """Quantized storage (codes, scales, zero points): not a ``nnx.Param``, so never trained and
  separated from trainable parameters by ``nnx.split(model, nnx.Param, ...)``."""


def _storage(value, names):
  return QuantStorage(value, sharding_names=names, eager_sharding=False)


class QuantizedWeight(nnx.Module):
  """A quantized kernel W [K, N]: what ``Linear.kernel`` holds after quantization.

  Attributes (arrays are ``QuantStorage`` variables carrying the kernel's logical axis names,
  so ``postrl.sharding.state_shardings`` places them like the float kernel):
    w_q: int8 codes [K, N], or uint8 [ceil(K/2), N] packed two per byte (4-bit).
    scales: float32 [G, N]; with ``spec.double_quant`` the int8 codes of the scales [G, N]
      (read float scales with ``scale_values()``).
    zeros: float32 [G, N] zero points, or None (symmetric).
    scales2, scales_offset: second-level constants of double quantization, else None.
    spec: the ``QuantSpec``; shape: (K, N).
  """

  def __init__(self, w_q, scales, zeros=None, *, spec: QuantSpec, shape: Sequence[int],
               names: Sequence[str | None] | None = None, scales2=None, scales_offset=None):
    K, N = (int(d) for d in shape)
    G = spec.num_groups(K)
    rows = -(-K // 2) if spec.packed else K
    expect = {"w_q": ((rows, N), jnp.uint8 if spec.packed else jnp.int8),
              "scales": ((G, N), jnp.int8 if spec.double_quant else jnp.float32)}
    for label, arr in (("w_q", w_q), ("scales", scales)):
      want_shape, want_dtype = expect[label]
      if tuple(arr.shape) != want_shape or arr.dtype != want_dtype:
        raise QuantError(f"QuantizedWeight {spec.name} of shape {(K, N)}: {label} must be "
                         f"{jnp.dtype(want_dtype).name}{list(want_shape)}, got "
                         f"{arr.dtype}{list(arr.shape)}")
    if (zeros is None) != spec.symmetric or (zeros is not None and tuple(zeros.shape) != (G, N)):
      raise QuantError(f"QuantizedWeight {spec.name}: zeros must be "
                       f"{'None (symmetric)' if spec.symmetric else f'float32{[G, N]}'}, got "
                       f"{None if zeros is None else list(zeros.shape)}")
    if spec.double_quant and (scales2 is None or scales_offset is None):
      raise QuantError("QuantizedWeight with double_quant needs scales2 and scales_offset")
    names = tuple(names) if names is not None else (None, None)
    self.spec = spec
    self.shape = (K, N)
    self.names = names
    self.w_q = _storage(jnp.asarray(w_q), names)
    self.scales = _storage(jnp.asarray(scales), names)
    self.zeros = None if zeros is None else _storage(jnp.asarray(zeros, jnp.float32), names)
    self.scales2 = None if scales2 is None else _storage(
        jnp.asarray(scales2, jnp.float32), names)
    self.scales_offset = None if scales_offset is None else _storage(
        jnp.asarray(scales_offset, jnp.float32), ())

  @classmethod
  def from_codes(cls, codes_KxN, scales_GxN, zeros_GxN=None, spec: QuantSpec = INT8, *,
                 names=None, name: str = "weight") -> "QuantizedWeight":
    """Stores codes from any quantizer (RTN, GPTQ, AWQ): packs int4, double-quantizes the scales
    when ``spec.double_quant``. ``name`` only labels errors."""
    _check_2d(codes_KxN, name)
    K, N = codes_KxN.shape
    G = spec.num_groups(K)
    if tuple(scales_GxN.shape) != (G, N):
      raise QuantError(f"{name}: scales of {spec.name} for a [{K}, {N}] kernel must be [{G}, {N}] "
                       f"(G = ceil(K / group_size)), got {list(scales_GxN.shape)}")
    codes = jnp.asarray(codes_KxN)
    traced = isinstance(codes, jax.core.Tracer)
    if not jnp.issubdtype(codes.dtype, jnp.integer) and (
        traced or not bool(jnp.all(codes == jnp.round(codes)))):
      # integral floats (e.g. rounded codes from another library) are taken as they are
      raise QuantError(f"{name}: codes of {spec.name} must be integers, got {codes.dtype} values "
                       f"that are not all whole numbers (round them; a cast would truncate)")
    lo, hi = -2 ** (spec.bits - 1), 2 ** (spec.bits - 1) - 1
    unchecked = spec.bits == 8 and codes.dtype == jnp.int8  # every int8 is a valid int8 code
    if not traced and not unchecked:
      cmin, cmax = int(jnp.min(codes)), int(jnp.max(codes))
      if cmin < lo or cmax > hi:
        # int4 keeps the low nibble and int8 wraps: an out-of-range code would be stored as another
        raise QuantError(f"{name}: codes of {spec.name} must lie in [{lo}, {hi}], got range "
                         f"[{cmin}, {cmax}]")
    codes = codes.astype(jnp.int8)
    w_q = pack_int4(codes) if spec.packed else codes
    scales2 = offset = None
    scales = jnp.asarray(scales_GxN, jnp.float32)
    if spec.double_quant:
      scales, scales2, offset = double_quantize(scales)
    return cls(w_q, scales, zeros_GxN, spec=spec, shape=(K, N), names=names, scales2=scales2,
               scales_offset=offset)

  @classmethod
  def quantize(cls, w_KxN, spec: "QuantSpec | str" = INT8, *, names=None,
               name: str = "weight") -> "QuantizedWeight":
    """Round-to-nearest (RTN) quantization of a float kernel [K, N] (module docstring formulas).

    With ``spec.double_quant`` the codes are computed from the float scales and the scales are
    then double-quantized (QLoRA quantizes W with c2 and stores c2 double-quantized).
    Raises QuantError naming ``name`` for a non-2-D or non-finite kernel.
    """
    spec = parse_spec(spec)
    _check_2d(w_KxN, name)
    w = jnp.asarray(w_KxN, jnp.float32)
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
      raise QuantError(f"{name}: kernel {list(w.shape)} contains NaN or inf; cannot quantize")
    codes, scales, zeros = _rtn(w, spec)
    return cls.from_codes(codes, scales, zeros, spec, names=names, name=name)

  def with_names(self, names: Sequence[str | None]) -> "QuantizedWeight":
    """The same storage with other logical axis names (for sharding)."""
    return QuantizedWeight(self.w_q[...], self.scales[...],
                           None if self.zeros is None else self.zeros[...], spec=self.spec,
                           shape=self.shape, names=names,
                           scales2=None if self.scales2 is None else self.scales2[...],
                           scales_offset=None if self.scales_offset is None
                           else self.scales_offset[...])

  def codes(self):
    """Unpacked int8 codes [K, N]."""
    w_q = self.w_q[...]
    return unpack_int4(w_q, self.shape[0]) if self.spec.packed else w_q

  def scale_values(self):
    """Float32 scales [G, N] (double-dequantized when ``spec.double_quant``)."""
    if self.spec.double_quant:
      return double_dequantize(self.scales[...], self.scales2[...], self.scales_offset[...])
    return self.scales[...]

  def zero_values(self):
    """Float32 zero points [G, N] or None."""
    return None if self.zeros is None else self.zeros[...]

  def dequantize(self, dtype=jnp.float32):
    """Ŵ [K, N] in ``dtype`` (computed in float32)."""
    return dequantize_codes(self.codes(), self.scale_values(), self.zero_values(),
                            self.spec).astype(dtype)

  @property
  def nbytes(self) -> int:
    """Bytes of the stored arrays (packed codes, scales, zeros, second-level constants)."""
    return sum(int(np.prod(v.get_value().shape)) * jnp.dtype(v.get_value().dtype).itemsize
               for v in (self.w_q, self.scales, self.zeros, self.scales2, self.scales_offset)
               if v is not None)

  def dot(self, x):
    """x @ Ŵ; see ``quantized_dot``."""
    return quantized_dot(x, self)


def rtn_quantize(w_KxN, spec: "QuantSpec | str" = INT8, *, names=None,
                 name: str = "weight") -> QuantizedWeight:
  """Round-to-nearest absmax / min-max / NF4 quantization; ``QuantizedWeight.quantize``."""
  return QuantizedWeight.quantize(w_KxN, spec, names=names, name=name)


def quantized_dot(x_xK, qw: QuantizedWeight, *, impl: str = "auto"):
  """y = x Ŵ, Ŵ = dequantize(qw), in x's dtype: the ONE quantized matmul of the library.

  int8 / int4 codes go through ``kernels.quantized_matmul`` (``impl="auto"``: the Pallas kernel
  that reads the codes on a single GPU / TPU where it is faster, XLA's dequantise-then-dot on CPU,
  meshes and elsewhere); NF4 (a 16-level lookup) always takes the XLA path.

  Args:
    x_xK: activations [..., K].
    qw: the quantized kernel [K, N].
    impl: "auto" | "xla" | "pallas" (see ``kernels.quantized_matmul``).
  Returns:
    [..., N] in x's dtype.
  """
  k = qw.shape[0]
  if getattr(x_xK, "ndim", 0) < 1 or x_xK.shape[-1] != k:
    raise QuantError(f"quantized_dot: x must be [..., K] with K={k} for the {qw.spec.name} kernel "
                     f"of shape {list(qw.shape)}, got shape {tuple(getattr(x_xK, 'shape', ()))}")
  if not jnp.issubdtype(x_xK.dtype, jnp.floating):
    raise QuantError(f"quantized_dot: x must be floating point (bf16 / f16 / f32), got "
                     f"{x_xK.dtype} (an integer x would get an integer-rounded kernel)")
  if qw.spec.kind == "nf4":
    return jnp.dot(x_xK, qw.dequantize(jnp.float32).astype(x_xK.dtype))
  from kernels.quantized_matmul import quantized_matmul  # pylint: disable=import-outside-toplevel
  return quantized_matmul(x_xK, qw.w_q[...], qw.scale_values(), bits=qw.spec.bits,
                          group_size=qw.spec.group_size, zeros=qw.zero_values(), impl=impl)
