"""AWQ: activation-aware weight quantization (Lin et al. 2024, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration").

Salient input channels (large mean |x|) are protected by scaling them up before round-to-nearest
quantization and scaling the input down by the same factor (paper Sec. 3.2, Eq. 4-5):

    Q(W) x  ->  Q(diag(s) W) (diag(s)^-1 x)           (our kernel W is [K, N]: y = x W)
    s = s_X^α,  s_X,j = mean_t |x_tj|,   α* = argmin_α ||Q(diag(s) W) (diag(s)^-1 X) - W X||

with a grid of ``n_grid`` = 20 values α = i / n_grid, i = 0..19 (the reference code
``auto_scale.py``; the survey's "[0, 1]" includes 1, the code stops at 0.95), and s normalised by
sqrt(max(s) min(s)) (code; this does not change Q's error, only the numbers' range). α = 0 is
s = 1, plain RTN, so AWQ's error on the calibration set is never above RTN's.

The output error over all calibration tokens is computed from the layer's Hessian
H = 2 X^T X / n (``calibrate.LayerStats``), with ΔW = W - diag(s)^-1 Q(diag(s) W):

    ||X W - X W'||_F^2 / (n N) = tr(ΔW^T H ΔW) / (2 N)

which is the reference's objective evaluated on every calibration token at K^2 N cost per α
instead of n K N. Differences from the reference, which measures the error at the output of the
module that reads the scaled layers (``module2inspect``: the whole attention for q/k/v, the whole
MLP for gate/up): here it is measured at the outputs of the scaled Linears themselves (q/k/v
outputs concatenated; gate/up concatenated).

Where 1/s goes (each fold is exact in float):
  * q/k/v (one shared s): ``input_layernorm.weight /= s``; gate/up: ``post_attention_layernorm``.
  * down_proj: the columns (and bias) of ``up_proj`` are divided by s (silu(g) * (u / s) = h / s),
    as the reference does.
  * o_proj: its input is the attention output, linear in v_proj's outputs, so 1/s goes into
    v_proj's columns. With grouped-query attention one v channel feeds the same channel of every
    query head in its group; the reference skips o_proj then (``if v.shape == o.shape``). Here s is
    tied across the heads of a group instead (s_X averaged over them) and folded into v_proj.
Weight clipping (the reference's ``auto_clip``; paper Sec. 3.3 mentions it only briefly), when
``clip``: per (group, output) the clip value max_val = (1 - i / n_grid) absmax, i = 0 ..
max_shrink n_grid, minimising that group's output error on the scaled inputs (the diagonal block
of diag(s)^-1 H diag(s)^-1); q_proj / k_proj are not clipped (reference). All searches use the
block's original weights and calibration inputs; then the scales are applied, the clipping
searched, and every layer quantized by round-to-nearest (``formats``).

Sequential: block i is calibrated on the outputs of the already quantized blocks < i (as GPTQ does;
the reference AWQ feeds the float outputs of the block instead).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from postrl.quant.calibrate import block_linears, calibrate_sequential, target_layers
from postrl.quant.formats import (QuantError, QuantizedWeight, QuantSpec, dequantize_codes,
                                  parse_spec, quant_params, quantize_codes)
from postrl.quant.model import DEFAULT_TARGETS, quantize_model

_HI = jax.lax.Precision.HIGHEST


def rtn_dequant(w_KxN, spec: QuantSpec):
  """Q(W): round-to-nearest quantize-dequantize with ``formats`` (traceable)."""
  s, z = quant_params(w_KxN, spec)
  return dequantize_codes(quantize_codes(w_KxN, s, z, spec), s, z, spec)


def output_mse(dw_KxN, hessian_KxK):
  """||X ΔW||_F^2 / (n N) = tr(ΔW^T H ΔW) / (2N) for H = 2 X^T X / n."""
  return jnp.sum(dw_KxN * jnp.dot(hessian_KxK, dw_KxN, precision=_HI)) / (2 * dw_KxN.shape[1])


def _check_grid(n_grid):
  # n_grid = 0 divides by zero in the clip grid (a NaN kernel); 2.5 gives a grid of odd steps
  if not isinstance(n_grid, int) or isinstance(n_grid, bool) or n_grid < 1:
    raise QuantError(f"AWQ n_grid must be an integer >= 1, got {n_grid!r}")


def _check_layer(w_KxN, hessian_KxK, name, mean_abs_K=None):
  """``gptq.check_layer`` (2-D kernel, [K, K] Hessian, finite) and s_X of shape [K]."""
  from postrl.quant.gptq import check_layer  # pylint: disable=import-outside-toplevel
  check_layer(w_KxN, hessian_KxK, name)
  if mean_abs_K is not None and np.shape(mean_abs_K) != (np.shape(w_KxN)[0],):
    raise QuantError(f"{name}: AWQ needs one activation scale per input channel "
                     f"({np.shape(w_KxN)[0]}), got shape {np.shape(mean_abs_K)}")


def grid_scales(mean_abs_K, alpha):
  """s = s_X^α (s_X clamped at 1e-4 as in the reference), normalised by sqrt(max s · min s)."""
  s = jnp.maximum(jnp.asarray(mean_abs_K, jnp.float32), 1e-4) ** alpha
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("spec", "n_grid"))
def _scale_losses(w_KxN, hessian_KxK, mean_abs_K, *, spec, n_grid):
  def loss(alpha):
    s = grid_scales(mean_abs_K, alpha)[:, None]
    dw = w_KxN - rtn_dequant(w_KxN * s, spec) / s
    return output_mse(dw, hessian_KxK)
  return jax.lax.map(loss, jnp.arange(n_grid, dtype=jnp.float32) / n_grid)


def awq_search_scale(w_KxN, hessian_KxK, mean_abs_K, spec: QuantSpec | str = "int4_g128", *,
                     n_grid: int = 20):
  """AWQ's grid search (Lin et al. 2024, Eq. 5): the per-input-channel scale s = s_X^α* with

      α* = argmin_{α = i / n_grid} tr(ΔW^T H ΔW),  ΔW = W - diag(s)^-1 Q(diag(s) W)

  i.e. the mean squared error of the layer's outputs over the calibration tokens.

  Args:
    w_KxN: float kernel (several layers reading the same input concatenated along N).
    hessian_KxK: H = 2 X^T X / n of that input.
    mean_abs_K: s_X, mean |x| per input channel.
    spec: quantization format (RTN).
    n_grid: grid points (α = 0 included: plain RTN).
  Returns:
    (s_K float32, α*, losses [n_grid] as float64 numpy: the output MSE of each α).
  """
  spec = parse_spec(spec)
  _check_grid(n_grid)
  _check_layer(w_KxN, hessian_KxK, "awq_search_scale", mean_abs_K)
  w = jnp.asarray(w_KxN, jnp.float32)
  losses = np.asarray(_scale_losses(w, jnp.asarray(hessian_KxK, jnp.float32),
                                    jnp.asarray(mean_abs_K, jnp.float32), spec=spec,
                                    n_grid=n_grid), np.float64)
  if not np.all(np.isfinite(losses)):
    raise QuantError("AWQ scale search: non-finite output error (NaN/inf in weights or inputs)")
  best = int(np.argmin(losses))
  alpha = best / n_grid
  return grid_scales(mean_abs_K, alpha), alpha, losses


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def _clip_values(w_KxN, hessian_KxK, *, spec, n_grid, max_shrink):
  K, N = w_KxN.shape
  g = K if spec.group_size is None else spec.group_size
  G = -(-K // g)
  pad = G * g - K
  w = jnp.pad(w_KxN, ((0, pad), (0, 0)))
  h = jnp.pad(hessian_KxK, ((0, pad), (0, pad)))
  hg = jnp.stack([h[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(G)])  # [G, g, g]
  wg = w.reshape(G, g, N)
  absmax = jnp.max(jnp.abs(wg), axis=1)  # [G, N]
  valid = (jnp.arange(G * g) < K).reshape(G, g, 1)

  def err(shrink):
    mx = absmax * shrink
    clipped = jnp.clip(wg, -mx[:, None], mx[:, None])
    full = jnp.where(valid, clipped, clipped[:, :1]).reshape(G * g, N)[:K]  # edge rows: no effect
    dq = jnp.pad(rtn_dequant(full, spec), ((0, pad), (0, 0))).reshape(G, g, N)
    d = jnp.where(valid, wg - dq, 0.0)
    return jnp.einsum("gkn,gkj,gjn->gn", d, hg, d, precision=_HI)  # per (group, output) error

  steps = int(max_shrink * n_grid)
  shrinks = 1.0 - jnp.arange(steps + 1, dtype=jnp.float32) / n_grid
  errs = jax.lax.map(err, shrinks)  # [S, G, N]
  return absmax * shrinks[jnp.argmin(errs, axis=0)]


def awq_clip(w_KxN, hessian_KxK, spec: QuantSpec | str = "int4_g128", *, n_grid: int = 20,
             max_shrink: float = 0.5):
  """AWQ's clipping search (reference ``auto_clip_layer``): per (group, output column) the clip
  value c = (1 - i / n_grid) absmax(W_group), i = 0 .. max_shrink n_grid, minimising that group's
  output error ΔW_g^T H_gg ΔW_g after clip-then-RTN; returns W clipped to [-c, c].

  Args:
    w_KxN: float kernel (already scaled by AWQ's s).
    hessian_KxK: H of its (already scaled) inputs.
  Returns:
    The clipped kernel [K, N] (to be quantized by RTN with ``spec``).
  """
  spec = parse_spec(spec)
  _check_grid(n_grid)
  if not 0 <= max_shrink < 1:
    raise QuantError(f"AWQ max_shrink must be in [0, 1), got {max_shrink}")
  _check_layer(w_KxN, hessian_KxK, "awq_clip")
  w = jnp.asarray(w_KxN, jnp.float32)
  K = w.shape[0]
  c = _clip_values(w, jnp.asarray(hessian_KxK, jnp.float32), spec=spec, n_grid=n_grid,
                   max_shrink=float(max_shrink))
  g = K if spec.group_size is None else spec.group_size
  c_KxN = jnp.repeat(c, g, axis=0)[:K]
  return jnp.clip(w, -c_KxN, c_KxN)


def awq_quantize(w_KxN, hessian_KxK, mean_abs_K, spec: QuantSpec | str = "int4_g128", *,
                 n_grid: int = 20, clip: bool = False, max_shrink: float = 0.5,
                 name: str = "weight"):
  """AWQ of a single layer: (Q(diag(s) W) as a ``QuantizedWeight``, s_K).

  The layer must then read diag(s)^-1 x: y = (x / s) Q(diag(s) W) ≈ x W (fold 1/s into whatever
  produces x; ``awq_quantize_model`` does this for the decoder blocks).
  """
  spec = parse_spec(spec)
  _check_layer(w_KxN, hessian_KxK, name, mean_abs_K)
  s, _, _ = awq_search_scale(w_KxN, hessian_KxK, mean_abs_K, spec, n_grid=n_grid)
  w = jnp.asarray(w_KxN, jnp.float32) * s[:, None]
  if clip:
    h = jnp.asarray(hessian_KxK, jnp.float32) / s[:, None] / s[None, :]
    w = awq_clip(w, h, spec, n_grid=n_grid, max_shrink=max_shrink)
  return QuantizedWeight.quantize(w, spec, name=name), s


# --------------------------------------------------------------------------- model transform


def _scale_param(param, factor, axis):
  """param *= factor along ``axis`` (in float32, stored back in the param's dtype)."""
  v = param[...]
  shape = [1] * v.ndim
  shape[axis] = -1
  param[...] = (v.astype(jnp.float32) * jnp.reshape(factor, shape)).astype(v.dtype)


def _tied_mean_abs(mean_abs_K, num_heads, num_kv_heads, head_dim):
  """s_X of o_proj's input averaged over the query heads sharing a key/value head."""
  rep = num_heads // num_kv_heads
  m = jnp.asarray(mean_abs_K).reshape(num_kv_heads, rep, head_dim).mean(axis=1, keepdims=True)
  return jnp.broadcast_to(m, (num_kv_heads, rep, head_dim)).reshape(-1)


# The Linears whose input rows a fold scales, per fold kind (paths inside a block).
FOLD_READERS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


def fold_scale(model, block_index: int, kind: str, s_K) -> None:
  """Rescale one input of block ``block_index`` without changing the model's function (float):
  the readers' kernel rows are multiplied by s and the producer of their input divided by s.

      kind "qkv":     input_layernorm.weight /= s;            q/k/v rows *= s
      kind "gate_up": post_attention_layernorm.weight /= s;   gate/up rows *= s
      kind "down":    up_proj columns (and bias) /= s;        down_proj rows *= s
      kind "o":       v_proj columns (and bias) /= s_v;       o_proj rows *= s, where s must be
                      tied across the query heads of a key/value group (s_o[h, d] = s_v[h // r, d])

  (AWQ, Lin et al. 2024, Sec. 3.2; SmoothQuant, Xiao et al. 2023, Sec. 4: Y = (X diag(s)^-1)
  (diag(s) W).) Parameters must be float (not yet quantized).
  """
  if kind not in FOLD_READERS:
    raise QuantError(f"fold_scale: kind must be one of {sorted(FOLD_READERS)}, got {kind!r}")
  num_blocks = len(model.layers)
  if not isinstance(block_index, (int, np.integer)) or not 0 <= block_index < num_blocks:
    raise QuantError(f"fold_scale: block_index must be in [0, {num_blocks}), got {block_index!r}")
  block = model.layers[block_index]
  cfg = model.config
  s = jnp.asarray(s_K, jnp.float32)
  readers = block_linears(model, block_index)
  first = readers[f"layers.{block_index}.{FOLD_READERS[kind][0]}"]
  if first.quantized:
    raise QuantError(f"fold_scale: layers.{block_index}.{FOLD_READERS[kind][0]} is quantized; "
                     f"fold scales into float kernels (before quantizing)")
  K = first.kernel[...].shape[0]
  if s.shape != (K,):
    raise QuantError(f"fold_scale: the scale of layers.{block_index} {kind} must have one value "
                     f"per input channel ({K}), got shape {tuple(s.shape)}")
  if kind == "qkv":
    _scale_param(block.input_layernorm.weight, 1.0 / s, 0)
  elif kind == "gate_up":
    _scale_param(block.post_attention_layernorm.weight, 1.0 / s, 0)
  elif kind == "o":
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    s_hkd = s.reshape(cfg.num_key_value_heads, rep, cfg.dim_per_head)
    if not bool(jnp.all(s_hkd == s_hkd[:, :1])):
      raise QuantError(f"layers.{block_index}.self_attn.o_proj: the scale must be equal across "
                       f"the {rep} query heads that share a key/value head (grouped-query "
                       f"attention), or it cannot be folded into v_proj")
    s_v = s_hkd[:, 0].reshape(-1)
    v = block.self_attn.v_proj
    _scale_param(v.kernel, 1.0 / s_v, 1)
    if v.bias is not None:
      _scale_param(v.bias, 1.0 / s_v, 0)
  elif kind == "down":
    up = block.mlp.up_proj
    _scale_param(up.kernel, 1.0 / s, 1)
    if up.bias is not None:
      _scale_param(up.bias, 1.0 / s, 0)
  lin = block_linears(model, block_index)
  for n in FOLD_READERS[kind]:
    _scale_param(lin[f"layers.{block_index}.{n}"].kernel, s, 0)


def _awq_block(model, i, stats, spec, n_grid, clip, max_shrink, chosen):
  lin = block_linears(model, i)
  cfg = model.config
  p = f"layers.{i}."
  selected = [n for n in lin if n in chosen]
  wanted = lambda *names: [p + n for n in names if p + n in selected]

  def search(names):
    w = jnp.concatenate([lin[n].kernel[...].astype(jnp.float32) for n in names], axis=1)
    st = stats[names[0]]
    mean_abs = st.mean_abs_K
    if names[0].endswith("o_proj"):
      mean_abs = _tied_mean_abs(mean_abs, cfg.num_attention_heads, cfg.num_key_value_heads,
                                cfg.dim_per_head)
    s, alpha, _ = awq_search_scale(w, st.hessian_KxK, mean_abs, spec, n_grid=n_grid)
    return s, alpha

  # 1) all scale searches on the block's original weights (reference order). A fold must reach
  # every reader of the scaled input, so a group is scaled only when all its readers are float.
  def is_float(*names):
    return all(p + n in lin and not lin[p + n].quantized for n in names)

  plan = []
  attn, mlp = FOLD_READERS["qkv"], FOLD_READERS["gate_up"]
  if wanted(*attn) and is_float(*attn):
    plan.append(("qkv", [p + n for n in attn], search(wanted(*attn))))
  if wanted("self_attn.o_proj") and is_float("self_attn.o_proj", "self_attn.v_proj"):
    plan.append(("o", wanted("self_attn.o_proj"), search(wanted("self_attn.o_proj"))))
  if wanted(*mlp) and is_float(*mlp):
    plan.append(("gate_up", [p + n for n in mlp], search(wanted(*mlp))))
  if wanted("mlp.down_proj") and is_float("mlp.down_proj", "mlp.up_proj"):
    plan.append(("down", wanted("mlp.down_proj"), search(wanted("mlp.down_proj"))))

  # 2) fold: the readers' rows *= s, the producer of their input /= s.
  scales, alphas = {}, {}
  for kind, readers, (s, alpha) in plan:
    fold_scale(model, i, kind, s)
    for n in readers:
      scales[n], alphas[n] = s, alpha

  # 3) clip search on the scaled weights / inputs, then RTN.
  result = {}
  for n in selected:
    w = lin[n].kernel[...].astype(jnp.float32)
    if clip and not re.search(r"(q_proj|k_proj)$", n):
      s = scales.get(n, jnp.ones(w.shape[0], jnp.float32))
      h = jnp.asarray(stats[n].hessian_KxK) / s[:, None] / s[None, :]
      w = awq_clip(w, h, spec, n_grid=n_grid, max_shrink=max_shrink)
    result[n] = QuantizedWeight.quantize(w, spec, name=n)
  alphas = {n: a for n, a in alphas.items() if n in result}
  if result:
    quantize_model(model, targets="^(" + "|".join(re.escape(n) for n in result) + ")$",
                   quantizer=lambda name, _w: result[name])
  return alphas


def awq_quantize_model(model, calib_tokens_BxT, spec: QuantSpec | str = "int4_g128", *,
                       n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5,
                       targets: str = DEFAULT_TARGETS, segment_ids_BxT=None,
                       batch_size: int = 8) -> dict[str, float]:
  """AWQ-quantize every targeted Linear of the decoder blocks in place (see the module docstring).

  Args:
    model: a ``postrl.models.Transformer``; its norms, v_proj / up_proj columns change (the scale
      folds) and its kernels become ``QuantizedWeight``.
    calib_tokens_BxT: int calibration tokens.
    spec: weight format (AWQ's setting: "int4_g128", or "int4_g128_asym" with zero points as the
      reference code defaults to).
    n_grid: α grid size (and clip grid), 20 as in the reference.
    clip: run the clipping search (reference ``auto_clip``).
    max_shrink: largest clip fraction (0.5).
    targets: regex over layer names (``quantize_model``'s default: every Linear in the blocks).
    segment_ids_BxT, batch_size: see ``calibrate.calibrate_sequential``.
  Returns:
    {layer name: chosen α}.
  """
  spec = parse_spec(spec)
  _check_grid(n_grid)
  if not 0 <= max_shrink < 1:
    raise QuantError(f"AWQ max_shrink must be in [0, 1), got {max_shrink}")
  chosen = target_layers(model, targets, "awq_quantize_model")
  alphas = {}

  def compress(i, stats):
    alphas.update(_awq_block(model, i, stats, spec, n_grid, clip, max_shrink, chosen))

  calibrate_sequential(model, calib_tokens_BxT, compress, segment_ids_BxT=segment_ids_BxT,
                       batch_size=batch_size)
  return alphas
