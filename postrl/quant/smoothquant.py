"""SmoothQuant W8A8 (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models").

Activation outliers live in a few input channels; SmoothQuant migrates them into the weights with
a per-input-channel scale, exactly (Sec. 4, Eq. 3-4; our kernel W is [K, N], y = x W):

    Y = (X diag(s)^-1) (diag(s) W),      s_j = max|X_j|^α / max|W_j|^(1-α),   α = 0.5

where max|X_j| is over the calibration tokens and max|W_j| over row j of every Linear reading X
(q/k/v together, gate/up together). diag(s)^-1 is folded into the RMSNorm weight that produces X
(the reference ``smooth_lm`` for Llama: input_layernorm -> q/k/v, post_attention_layernorm ->
gate/up; o_proj and down_proj are not smoothed, as in the reference, but are still W8A8).

W8A8 (the paper's "O1"-style setting of the reference ``fake_quant.py``): weights int8 absmax per
output channel (static), activations int8 absmax per token, computed at run time (dynamic):

    x̂_t = s_t q_t,  s_t = max_j |x_tj| / 127,  q_t = round(x_t / s_t)
    y_t = s_t (q_t · Q) s_w                      (int8 x int8 products summed in int32)

Run time: ``W8A8Weight`` is a ``formats.QuantizedWeight`` (int8, per channel) whose ``dot``
quantizes its input per token first and multiplies in integers, so ``Linear.__call__``, which
calls ``kernel.dot(x)`` for quantized kernels, needs no change.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from postrl.quant.awq import FOLD_READERS, fold_scale
from postrl.quant.calibrate import block_linears, calibrate, target_layers
from postrl.quant.formats import INT8, QuantError, QuantizedWeight
from postrl.quant.model import DEFAULT_TARGETS, quantize_model


def smoothing_scales(max_abs_x_K, w_KxN, *, alpha: float = 0.5):
  """s_j = max|X_j|^α / max_n |W_jn|^(1-α) (SmoothQuant Eq. 4), both clamped at 1e-5 as in the
  reference ``smooth_ln_fcs``.

  Args:
    max_abs_x_K: max_t |x_tj| over the calibration tokens.
    w_KxN: every kernel reading x, concatenated along N.
    alpha: migration strength in [0, 1].
  """
  if not 0.0 <= alpha <= 1.0:
    raise QuantError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
  if np.ndim(w_KxN) != 2 or np.shape(max_abs_x_K) != (np.shape(w_KxN)[0],):
    raise QuantError(f"SmoothQuant: need max|X| of shape [K] and kernels [K, N], got "
                     f"{np.shape(max_abs_x_K)} and {np.shape(w_KxN)}")
  x = jnp.maximum(jnp.asarray(max_abs_x_K, jnp.float32), 1e-5)
  w = jnp.maximum(jnp.max(jnp.abs(jnp.asarray(w_KxN, jnp.float32)), axis=1), 1e-5)
  return x ** alpha / w ** (1.0 - alpha)


@functools.partial(jax.jit, static_argnames="bits")
def quantize_per_token(x_xK, *, bits: int = 8):
  """Dynamic per-token absmax quantization: (codes int8 [..., K], scales float32 [..., 1]),
  s_t = max_j |x_tj| / (2^(b-1) - 1), q_t = round(x_t / s_t) (LLM.int8() "vector-wise"; the
  SmoothQuant reference's ``quantize_activation_per_token_absmax``)."""
  qmax = 2 ** (bits - 1) - 1
  x = x_xK.astype(jnp.float32)
  s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / qmax
  s = jnp.where(s > 0, s, 1.0)
  return jnp.clip(jnp.round(x / s), -qmax, qmax).astype(jnp.int8), s


def fake_quant_per_token(x_xK, *, bits: int = 8):
  """x̂ = s_t round(x_t / s_t): per-token quantize-dequantize (float32)."""
  q, s = quantize_per_token(x_xK, bits=bits)
  return q.astype(jnp.float32) * s


class W8A8Weight(QuantizedWeight):
  """An int8 per-output-channel kernel whose matmul quantizes its input per token (int8).

  ``dot(x)`` = s_t (q_t · codes) s_w: int8 x int8 -> int32 accumulation, then the two scales;
  equal to ``fake_quant_per_token(x) @ dequantize()`` up to float32 rounding.
  """

  def __init__(self, *args, act_bits: int = 8, **kwargs):
    super().__init__(*args, **kwargs)
    if self.spec.bits != 8 or self.spec.group_size is not None or not self.spec.symmetric:
      raise QuantError(f"W8A8Weight needs int8 symmetric per-channel weights, got {self.spec.name}")
    if act_bits != 8:
      raise QuantError(f"W8A8Weight: act_bits must be 8, got {act_bits}")
    self.act_bits = act_bits

  @classmethod
  def from_float(cls, w_KxN, *, names=None, name: str = "weight") -> "W8A8Weight":
    """RTN int8 absmax per output channel of a float kernel."""
    qw = QuantizedWeight.quantize(w_KxN, INT8, names=names, name=name)
    return cls(qw.w_q[...], qw.scales[...], None, spec=INT8, shape=qw.shape, names=qw.names)

  def with_names(self, names) -> "W8A8Weight":
    return W8A8Weight(self.w_q[...], self.scales[...], None, spec=self.spec, shape=self.shape,
                      names=names, act_bits=self.act_bits)

  def dot(self, x):
    q, s_t = quantize_per_token(x, bits=self.act_bits)
    acc = jnp.dot(q, self.w_q[...], preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * s_t * self.scales[...][0]).astype(x.dtype)


def smooth_model(model, stats: dict, *, alpha: float = 0.5) -> dict:
  """Migrate activation outliers into the weights, in place (function unchanged in float):
  for every block, s from ``smoothing_scales`` over q/k/v (folded into input_layernorm) and over
  gate/up (folded into post_attention_layernorm).

  Args:
    model: a ``postrl.models.Transformer`` with float kernels.
    stats: ``calibrate.calibrate(model, tokens)`` (``max_abs_K`` is used).
    alpha: migration strength (0.5 in the paper).
  Returns:
    {"layers.i.qkv" / "layers.i.gate_up": s_K}.
  """
  out = {}
  for i in range(len(model.layers)):
    lin = block_linears(model, i)
    for kind in ("qkv", "gate_up"):
      names = [f"layers.{i}.{n}" for n in FOLD_READERS[kind]]
      if any(lin[n].quantized for n in names):
        raise QuantError(f"smooth_model: {', '.join(names)} must be float (smooth before "
                         f"quantizing)")
      if names[0] not in stats:
        raise QuantError(f"smooth_model: no calibration statistics for {names[0]}")
      w = jnp.concatenate([lin[n].kernel[...].astype(jnp.float32) for n in names], axis=1)
      s = smoothing_scales(stats[names[0]].max_abs_K, w, alpha=alpha)
      fold_scale(model, i, kind, s)
      out[f"layers.{i}.{kind}"] = s
  return out


def smoothquant_model(model, calib_tokens_BxT, *, alpha: float = 0.5, smooth: bool = True,
                      targets: str = DEFAULT_TARGETS, segment_ids_BxT=None,
                      batch_size: int = 8) -> dict:
  """SmoothQuant W8A8 in place: smooth (α migration, from the float model's activation maxima,
  as the reference computes them) then replace every targeted kernel by a ``W8A8Weight``.

  ``smooth=False`` gives naive W8A8 (the paper's baseline). Returns the smoothing scales.
  """
  if not 0.0 <= alpha <= 1.0:
    raise QuantError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
  target_layers(model, targets, "smoothquant_model")
  scales = {}
  if smooth:
    stats = calibrate(model, calib_tokens_BxT, segment_ids_BxT=segment_ids_BxT,
                      batch_size=batch_size, with_hessian=False)
    scales = smooth_model(model, stats, alpha=alpha)
  quantize_model(model, targets=targets,
                 quantizer=lambda name, w: W8A8Weight.from_float(w, name=name))
  return scales

