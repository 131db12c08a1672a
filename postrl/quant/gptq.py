"""GPTQ: Hessian-aware weight quantization (Frantar et al. 2023, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"), and the OBS sweep it shares with SparseGPT.

Per layer, GPTQ minimises the layer-wise reconstruction error on calibration inputs X [n, K]

    argmin_Q ||X W - X Q||_F^2,      H = 2 X^T X / n      (our kernel W is [K, N]: y = x W)

by quantizing one input channel (one row of W; a "column" in the paper's [out, in] layout) at a
time and spreading its error over the rows not yet quantized with the Optimal Brain Surgeon update

    δ_F = -(w_q - quant(w_q)) / [H_F^-1]_qq · (H_F^-1)_{:, q}        (paper Eq. 2 / Alg. 1)

with the paper's three engineering steps: (1) a fixed order for all outputs, so one H^-1 serves
every column of W; (2) lazy batch updates: the update is applied inside a block of B = 128 rows
immediately and to the rows after the block once per block (Alg. 1, "E_{:, i-j}" and the block
update); (3) the rows of H_F^-1 needed in turn are the rows of the upper Cholesky factor U of
H^-1 (H^-1 = U^T U), computed once with dampening λ = 1% of mean(diag H) added to the diagonal.

Act-order (the reference code's ``--act-order``, "desc_act"): rows are processed by descending
diag(H), the input channels with the largest activations first.

Group scales. Groups run along K in the stored (original) row order, as ``formats`` stores them
(scales [G, N], no per-row group index), so:
  * without act-order (default dynamic groups), the scales of group g are computed by
    ``formats.quant_params`` when its first row is reached, from the *current* (already
    error-updated) rows of the group, as the reference does. (The reference reads the rows for
    the parameters from W, which lacks the updates made earlier in the same lazy block when the
    group does not start a block; here the updated rows are used; the two agree when group_size
    equals the block size, the default 128.)
  * with act-order the permuted rows of one group are scattered over the sweep, so the scales are
    "static groups" (the reference's ``--static-groups``): computed once from the original weights
    before the sweep, in the stored group layout; each row is quantized with the scales of its
    original group. This keeps the storage plain [G, N] (no g_idx permutation vector).
  * per output channel (group_size=None) the scales are computed once from the original weights
    (as the reference does), with or without act-order.

Input channels that are never active (diag(H) = 0) have their weights set to 0 and H_jj = 1,
as in the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from postrl.quant.calibrate import block_linears, calibrate_sequential, target_layers
from postrl.quant.formats import (QuantError, QuantizedWeight, QuantSpec, parse_spec,
                                  quant_params, quantize_codes, dequantize_codes)
from postrl.quant.model import DEFAULT_TARGETS, quantize_model

_HI = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------ shared OBS core


def prepare_hessian(w_KxN, hessian_KxK):
  """Dead inputs (H_jj = 0): H_jj := 1 and W_j := 0 (reference GPTQ / SparseGPT)."""
  h = jnp.asarray(hessian_KxK, jnp.float32)
  w = jnp.asarray(w_KxN, jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  return jnp.where(dead[:, None], 0.0, w), h


def inverse_hessian_upper(hessian_KxK, *, damp: float = 0.01):
  """Upper Cholesky factor U of (H + λI)^-1, λ = damp · mean(diag H):  (H + λI)^-1 = U^T U.

  Row q of U, divided by U_qq, is the OBS update direction of row q given that rows < q were
  already fixed (GPTQ Sec. 4 "Step 3: Cholesky Reformulation").
  """
  h = jnp.asarray(hessian_KxK, jnp.float32)
  k = h.shape[0]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
  lower = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=h.dtype))
  h_inv = (h_inv + h_inv.T) / 2
  return jnp.linalg.cholesky(h_inv).T


def obs_sweep(w_KxN, u_KxK, state, on_block, on_row, *, block_size: int):
  """The GPTQ / SparseGPT sweep with lazy batch updates (GPTQ Alg. 1; SparseGPT Alg. 1).

  For each block of ``block_size`` rows: ``state = on_block(state, W1, U1, i1)`` (W1 the block's
  current rows); then for each row i of the block: ``state, q = on_row(state, W1, i, i1)`` gives
  the compressed row q, and with err = (W1_i - q) / U_ii the rows after i in the block are updated
  W1 -= U1_{i,:}^T err; after the block, the later rows get W -= U_{block,:}^T Err.

  Args:
    w_KxN: float32 weights, K a multiple of ``block_size`` (pad with zero rows / identity H).
    u_KxK: ``inverse_hessian_upper`` of the (padded) Hessian.
    state: any pytree threaded through the callbacks.
  Returns:
    (Q_KxN compressed weights, final state).
  """
  K, N = w_KxN.shape
  bs = block_size

  def block_body(b, carry):
    w, q_all, st = carry
    i1 = b * bs
    w1 = jax.lax.dynamic_slice(w, (i1, 0), (bs, N))
    u1 = jax.lax.dynamic_slice(u_KxK, (i1, i1), (bs, bs))
    st = on_block(st, w1, u1, i1)

    def row_body(i, c):
      w1, q1, e1, st = c
      row = w1[i]
      st, q = on_row(st, w1, i, i1)
      err = (row - q) / u1[i, i]
      w1 = w1 - u1[i][:, None] * err[None, :]  # U1 is upper triangular: rows < i are untouched
      return w1, q1.at[i].set(q), e1.at[i].set(err), st

    zeros = jnp.zeros((bs, N), jnp.float32)
    _, q1, e1, st = jax.lax.fori_loop(0, bs, row_body, (w1, zeros, zeros, st))
    q_all = jax.lax.dynamic_update_slice(q_all, q1, (i1, 0))
    u_rows = jax.lax.dynamic_slice(u_KxK, (i1, 0), (bs, K))
    # Rows < i1 get zeros (U upper triangular); rows of this block are already final in q_all.
    w = w - jnp.dot(u_rows.T, e1, precision=_HI)
    return w, q_all, st

  _, q_all, state = jax.lax.fori_loop(0, K // bs, block_body,
                                      (w_KxN, jnp.zeros_like(w_KxN), state))
  return q_all, state


def pad_rows(w_KxN, hessian_KxK, multiple: int):
  """Pad K to a multiple: zero weight rows, identity Hessian rows (independent of the others,
  so the padded rows change nothing)."""
  K = w_KxN.shape[0]
  p = (-K) % multiple
  if not p:
    return w_KxN, hessian_KxK
  w = jnp.pad(w_KxN, ((0, p), (0, 0)))
  h = jnp.pad(hessian_KxK, ((0, p), (0, p))) + jnp.diag(
      jnp.concatenate([jnp.zeros(K), jnp.ones(p)]).astype(hessian_KxK.dtype))
  return w, h


def check_layer(w_KxN, hessian_KxK, name: str):
  """Shapes and finiteness of one layer's inputs (errors name the layer)."""
  if getattr(w_KxN, "ndim", None) != 2:
    raise QuantError(f"{name}: kernel must be 2-D [K, N], got shape {np.shape(w_KxN)}")
  K = w_KxN.shape[0]
  if tuple(np.shape(hessian_KxK)) != (K, K):
    raise QuantError(f"{name}: Hessian must be [{K}, {K}] for a kernel {list(w_KxN.shape)}, got "
                     f"{list(np.shape(hessian_KxK))}")
  if not bool(jnp.all(jnp.isfinite(jnp.asarray(w_KxN)))) or not bool(
      jnp.all(jnp.isfinite(jnp.asarray(hessian_KxK)))):
    raise QuantError(f"{name}: kernel or Hessian contains NaN or inf")


# ------------------------------------------------------------------------------------- GPTQ


def _row_spec(spec: QuantSpec) -> QuantSpec:
  return dataclasses.replace(spec, group_size=None, double_quant=False)


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "damp", "act_order", "static"))
def _gptq(w_KxN, hessian_KxK, *, spec, block_size, damp, act_order, static):
  K, N = w_KxN.shape
  w, h = prepare_hessian(w_KxN, hessian_KxK)
  w_orig = w
  gs = spec.group_size
  row_spec = _row_spec(spec)
  perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(K)
  w, h = w[perm], h[perm][:, perm]
  w, h = pad_rows(w, h, block_size)
  Kp = w.shape[0]
  u = inverse_hessian_upper(h, damp=damp)
  # Group of each swept (permuted, padded) row in the stored layout.
  orig_row = jnp.concatenate([perm, jnp.full((Kp - K,), K - 1, perm.dtype)])
  group_of = jnp.zeros((Kp,), jnp.int32) if gs is None else (orig_row // gs).astype(jnp.int32)
  asym = not spec.symmetric

  if static:
    s0, z0 = quant_params(w_orig, spec)
    state = (s0, z0 if asym else jnp.zeros_like(s0))
  else:
    G = Kp // gs
    state = (jnp.zeros((G, N), jnp.float32), jnp.zeros((G, N), jnp.float32))

  def on_block(st, w1, u1, i1):
    return st

  def group_params(st, w1, i, i1):
    rows = jax.lax.dynamic_slice(w1, (i, 0), (gs, N))
    valid = (i1 + i + jnp.arange(gs)) < K
    rows = jnp.where(valid[:, None], rows, rows[:1])  # padded rows copy a real one: min/max kept
    s, z = quant_params(rows, spec)
    g = (i1 + i) // gs
    return (st[0].at[g].set(s[0]), st[1].at[g].set(z[0] if asym else jnp.zeros_like(s[0])))

  def on_row(st, w1, i, i1):
    if not static:
      st = jax.lax.cond((i1 + i) % gs == 0, group_params, lambda st, *_: st, st, w1, i, i1)
    g = group_of[i1 + i]
    s, z = st[0][g][None], (st[1][g][None] if asym else None)
    codes = quantize_codes(w1[i][None], s, z, row_spec)
    return st, dequantize_codes(codes, s, z, row_spec)[0]

  q, (scales, zeros) = obs_sweep(w, u, state, on_block, on_row, block_size=block_size)
  q = q[:K][jnp.argsort(perm)]
  G = spec.num_groups(K)
  scales, zeros = scales[:G], (zeros[:G] if asym else None)
  codes = quantize_codes(q, scales, zeros, spec)
  return codes, scales, zeros, u


def gptq_quantize(w_KxN, hessian_KxK, spec: QuantSpec | str = "int4_g128", *,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = True,
                  static_groups: bool | None = None, name: str = "weight",
                  names=None) -> QuantizedWeight:
  """GPTQ-quantize one kernel (Frantar et al. 2023, Alg. 1; see the module docstring).

      for each row q (input channel) in order:  Q_q = quant(W_q)
                                                W_{>q} -= U_{q,>q}^T (W_q - Q_q) / U_qq
      H = 2 X^T X / n,  (H + λ I)^-1 = U^T U,  λ = damp · mean(diag H)

  Args:
    w_KxN: float kernel [in, out].
    hessian_KxK: H of the layer's calibration inputs (``calibrate.LayerStats.hessian_KxK``).
    spec: ``formats.QuantSpec`` or its name ("int4_g128", "int8", "int4", "nf4", ...).
    block_size: lazy-batch block B (128 in the paper).
    damp: dampening as a fraction of mean(diag H) (0.01 in the paper).
    act_order: process rows by descending diag(H).
    static_groups: group scales from the original weights before the sweep; default: equal to
      ``act_order`` (which requires it; per-channel scales are always computed up front).
    name: the layer's name, for error messages.
    names: logical axis names of the kernel (kept on the storage for sharding).
  Returns:
    A ``formats.QuantizedWeight`` with the GPTQ codes and scales.
  """
  spec = parse_spec(spec)
  check_layer(w_KxN, hessian_KxK, name)
  if block_size < 1:
    raise QuantError(f"{name}: GPTQ block_size must be >= 1, got {block_size}")
  if not 0 <= damp:
    raise QuantError(f"{name}: GPTQ damp must be >= 0, got {damp}")
  gs = spec.group_size
  if static_groups is None:
    static_groups = act_order or gs is None
  if gs is None:
    static_groups = True
  if act_order and not static_groups:
    raise QuantError(f"{name}: act_order with group_size={gs} needs static_groups=True (groups "
                     f"are stored in the original row order, without a per-row group index)")
  if not static_groups and block_size % gs:
    raise QuantError(f"{name}: GPTQ block_size {block_size} must be a multiple of the group size "
                     f"{gs} (a group's scales are computed when the sweep reaches its first row)")
  codes, scales, zeros, u = _gptq(jnp.asarray(w_KxN, jnp.float32),
                                  jnp.asarray(hessian_KxK, jnp.float32), spec=spec,
                                  block_size=block_size, damp=float(damp),
                                  act_order=bool(act_order), static=bool(static_groups))
  if not bool(jnp.all(jnp.isfinite(u))):
    raise QuantError(f"{name}: the Cholesky factorisation of the damped Hessian failed (not "
                     f"positive definite); raise damp (now {damp})")
  return QuantizedWeight.from_codes(codes, scales, zeros, spec, names=names, name=name)


def layer_error(w_KxN, w_hat_KxN, hessian_KxK) -> float:
  """Squared output error of a compressed layer per calibration token:
  ||X W - X Ŵ||_F^2 / n = tr(ΔW^T H ΔW) / 2 with H = 2 X^T X / n, ΔW = W - Ŵ."""
  d = jnp.asarray(w_KxN, jnp.float32) - jnp.asarray(w_hat_KxN, jnp.float32)
  return float(jnp.sum(d * jnp.dot(jnp.asarray(hessian_KxK, jnp.float32), d, precision=_HI)) / 2)


def gptq_quantize_model(model, calib_tokens_BxT, spec: QuantSpec | str = "int4_g128", *,
                        act_order: bool = True, static_groups: bool | None = None,
                        block_size: int = 128, damp: float = 0.01,
                        targets: str = DEFAULT_TARGETS, segment_ids_BxT=None,
                        batch_size: int = 8) -> dict[str, float]:
  """GPTQ-quantize every targeted Linear of the model's blocks in place, block-sequentially
  (Frantar et al. 2023, Sec. 5): the Hessians of block i come from the outputs of the already
  quantized blocks < i (``calibrate.calibrate_sequential``); within a block every layer sees the
  block's float weights (the reference default, without ``--true-sequential``).

  Args:
    model: a ``postrl.models.Transformer``; targeted kernels become ``QuantizedWeight``.
    calib_tokens_BxT: int calibration tokens (e.g. 128 x 2048 in the paper; 32 x 256 suffice for
      a 135M model on CPU).
    spec, act_order, static_groups, block_size, damp: see ``gptq_quantize``.
    targets: regex over layer names (``quantize_model``'s default: every Linear in the blocks).
    segment_ids_BxT, batch_size: see ``calibrate.calibrate_sequential``.
  Returns:
    {layer name: mean squared output error on its calibration inputs, tr(ΔW^T H ΔW) / (2 N)}.
  """
  spec = parse_spec(spec)
  chosen = target_layers(model, targets, "gptq_quantize_model")
  errors = {}

  def compress(i, stats):
    result = {}
    for name, lin in block_linears(model, i).items():
      if name not in chosen:
        continue
      w = lin.kernel[...].astype(jnp.float32)
      h = stats[name].hessian_KxK
      qw = gptq_quantize(w, h, spec, block_size=block_size, damp=damp, act_order=act_order,
                         static_groups=static_groups, name=name)
      result[name] = qw
      errors[name] = layer_error(w, qw.dequantize(), h) / w.shape[1]
    if result:
      quantize_model(model, targets="^(" + "|".join(re.escape(n) for n in result) + ")$",
                     quantizer=lambda name, _w: result[name])

  calibrate_sequential(model, calib_tokens_BxT, compress, segment_ids_BxT=segment_ids_BxT,
                       batch_size=batch_size)
  return errors
