"""One-shot pruning: magnitude, Wanda, SparseGPT; unstructured or N:M semi-structured (2:4).

Our kernel W is [K, N] (y = x W): row j is input channel j, column n is output n. "Per output"
therefore means per column, across K. In the N:M pattern every group of M consecutive *input*
weights of one output (M consecutive rows of a column) has N zeros (2:4: two zeros in each group
of four, the pattern sparse tensor cores accelerate).

* Magnitude (Han et al. 2015; the Wanda repo's ``prune_magnitude`` baseline): score |W_jn|,
  compared over the whole layer (unstructured) or within each N:M group.
* Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models",
  Eq. 1): score S_jn = |W_jn| · ||X_j||_2, compared per output (the paper's "per output row" of
  its [out, in] layout = our column), no weight update.
* SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot", Alg. 1): the GPTQ sweep (``gptq.obs_sweep``) with pruning as the
  "quantizer": rows (input channels) in order, each pruned weight's error spread over the rows
  not yet visited by the OBS update δ = -(w_j / [H_F^-1]_jj) (H_F^-1)_{j,:}, in lazy blocks of
  128 rows.
  The mask is adaptive: chosen per block of 128 rows, at the block's start, from the current
  (already updated) weights by the OBS saliency w_j^2 / [H_F^-1]_jj, the int(s · rows · N)
  smallest of the block; for N:M, per group of M rows when the sweep reaches it. Here H_F is
  the Hessian restricted to the rows not yet visited, and [H_F^-1]_jj = U_jj^2 for the upper
  Cholesky factor U of H^-1 (U^T U = H^-1), so the saliency is w^2 / U_jj^2: the reference
  code's ``W1 ** 2 / diag(Hinv1) ** 2``. (The survey's "w^2 / [H^-1]_ii^2" is this formula only
  when H^-1 is read as the Cholesky factor.) H = 2 X^T X / n with 1% dampening.

Exactness: unstructured magnitude prunes exactly floor(s · K N) weights of a layer, Wanda exactly
floor(s · K) per output, SparseGPT exactly floor(s · rows · N) per block of rows (all selections by
rank, so ties never change the count; the reference's ``<= threshold`` can prune one more).

``prune_model`` runs Wanda and SparseGPT block-sequentially (``calibrate.calibrate_sequential``):
block i is calibrated on the outputs of the already pruned blocks < i, as both reference codes do.
"""

from __future__ import annotations

import functools
import numbers
import re

import jax
import jax.numpy as jnp
import numpy as np

from postrl.quant.calibrate import block_linears, calibrate_sequential, target_layers
from postrl.quant.formats import QuantError
from postrl.quant.gptq import (check_layer, inverse_hessian_upper, obs_sweep, pad_rows,
                               prepare_hessian)
from postrl.quant.model import DEFAULT_TARGETS

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: str, sparsity: float):
  """"unstructured" -> None; "n:m" -> (n, m) zeros per group of m (checked against sparsity)."""
  if (not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool)
      or not 0.0 <= float(sparsity) < 1.0):
    raise QuantError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
  if pattern == "unstructured":
    return None
  m = re.fullmatch(r"(\d+):(\d+)", str(pattern))
  if m is None:
    raise QuantError(f"pruning pattern must be 'unstructured' or 'n:m' (e.g. '2:4'), got "
                     f"{pattern!r}")
  n, mm = int(m.group(1)), int(m.group(2))
  if not 0 < n < mm:
    raise QuantError(f"pruning pattern {pattern!r}: need 0 < n < m (n zeros in every m weights)")
  if abs(n / mm - float(sparsity)) > 1e-9:
    raise QuantError(f"pruning pattern {pattern!r} means sparsity {n / mm}, but sparsity="
                     f"{sparsity} was given")
  return n, mm


def _rank_mask_axis0(score_KxN, count):
  """True at the ``count`` smallest scores of each column (ties by index)."""
  ranks = jnp.argsort(jnp.argsort(score_KxN, axis=0, stable=True), axis=0, stable=True)
  return ranks < count


def _nm_mask(score_KxN, n, m, name="weight"):
  K, N = score_KxN.shape
  if K % m:
    raise QuantError(f"{name}: {n}:{m} pruning needs the input size K={K} divisible by {m}")
  return _rank_mask_axis0(score_KxN.reshape(K // m, m, N).transpose(1, 0, 2), n).transpose(
      1, 0, 2).reshape(K, N)


def _prune_by_score(w_KxN, score_KxN, sparsity, pattern, per_output, name):
  nm = parse_pattern(pattern, sparsity)
  if np.ndim(w_KxN) != 2:
    raise QuantError(f"{name}: can only prune a 2-D kernel [K, N], got shape {np.shape(w_KxN)}")
  sparsity = float(sparsity)
  w = jnp.asarray(w_KxN)
  K, N = w.shape
  if nm is not None:
    mask = _nm_mask(score_KxN, *nm, name=name)
  elif per_output:
    mask = _rank_mask_axis0(score_KxN, int(sparsity * K))
  else:
    flat = _rank_mask_axis0(score_KxN.reshape(-1, 1), int(sparsity * K * N))
    mask = flat.reshape(K, N)
  return jnp.where(mask, jnp.zeros((), w.dtype), w)


def magnitude_prune(w_KxN, *, sparsity: float = 0.5, pattern: str = "unstructured",
                    name: str = "weight"):
  """Zero the smallest |W_jn|: floor(s K N) of the layer, or n of every m rows of a column.

  Returns the pruned kernel [K, N].
  """
  return _prune_by_score(w_KxN, jnp.abs(jnp.asarray(w_KxN, jnp.float32)), sparsity, pattern,
                         False, name)


def wanda_prune(w_KxN, sq_norm_K, *, sparsity: float = 0.5, pattern: str = "unstructured",
                name: str = "weight"):
  """Wanda (Sun et al. 2024, Eq. 1): zero the smallest S_jn = |W_jn| · ||X_j||_2 per output n
  (floor(s K) of each column, or n of every m rows of each column). No weight update.

  Args:
    w_KxN: float kernel.
    sq_norm_K: ||X_j||_2^2 over the calibration tokens (``LayerStats.sq_norm_K``).
  """
  x = jnp.sqrt(jnp.asarray(sq_norm_K, jnp.float32))
  if x.shape != (np.shape(w_KxN)[0],):
    raise QuantError(f"{name}: Wanda needs one activation norm per input channel "
                     f"({np.shape(w_KxN)[0]}), got shape {tuple(x.shape)}")
  score = jnp.abs(jnp.asarray(w_KxN, jnp.float32)) * x[:, None]
  return _prune_by_score(w_KxN, score, sparsity, pattern, True, name)


@functools.partial(jax.jit, static_argnames=("sparsity", "nm", "block_size", "damp"))
def _sparsegpt(w_KxN, hessian_KxK, *, sparsity, nm, block_size, damp):
  K, N = w_KxN.shape
  w, h = prepare_hessian(w_KxN, hessian_KxK)
  w, h = pad_rows(w, h, block_size)
  u = inverse_hessian_upper(h, damp=damp)
  bs = block_size
  inf = jnp.float32(jnp.inf)

  def on_block(mask, w1, u1, i1):
    if nm is not None:
      return jnp.zeros_like(mask)
    valid = (i1 + jnp.arange(bs)) < K
    score = jnp.where(valid[:, None], w1 ** 2 / jnp.diag(u1)[:, None] ** 2, inf)
    count = jnp.floor(jnp.minimum(K - i1, bs).astype(jnp.float32) * N * sparsity).astype(
        jnp.int32)
    ranks = jnp.argsort(jnp.argsort(score.reshape(-1), stable=True), stable=True)
    return (ranks < count).reshape(bs, N)

  def choose_nm(mask, w1, u1, i):
    n, m = nm
    rows = jax.lax.dynamic_slice(w1, (i, 0), (m, N))
    d = jax.lax.dynamic_slice(jnp.diag(u1), (i,), (m,))
    sub = _rank_mask_axis0(rows ** 2 / d[:, None] ** 2, n)
    return jax.lax.dynamic_update_slice(mask, sub, (i, 0))

  def on_row(mask, w1, i, i1):
    if nm is not None:
      u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))
      mask = jax.lax.cond(i % nm[1] == 0, choose_nm, lambda mask, *_: mask, mask, w1, u1, i)
    return mask, jnp.where(mask[i], 0.0, w1[i])

  q, _ = obs_sweep(w, u, jnp.zeros((bs, N), bool), on_block, on_row, block_size=bs)
  return q[:K], u


def sparsegpt_prune(w_KxN, hessian_KxK, *, sparsity: float = 0.5,
                    pattern: str = "unstructured", block_size: int = 128, damp: float = 0.01,
                    name: str = "weight"):
  """SparseGPT (Frantar & Alistarh 2023, Alg. 1; see the module docstring): the pruned and
  OBS-compensated kernel [K, N].

  Args:
    w_KxN: float kernel.
    hessian_KxK: H = 2 X^T X / n of the layer's calibration inputs.
    sparsity: fraction pruned (per block of rows; n/m for an N:M pattern).
    pattern: "unstructured" or "n:m" ("2:4").
    block_size: rows per lazy block and per adaptive mask selection (128).
    damp: Hessian dampening, fraction of mean(diag H) (0.01).
  """
  nm = parse_pattern(pattern, sparsity)
  check_layer(w_KxN, hessian_KxK, name)
  if block_size < 1 or (nm is not None and block_size % nm[1]):
    raise QuantError(f"{name}: SparseGPT block_size {block_size} must be a positive multiple of "
                     f"the pattern's group size")
  if nm is not None and np.shape(w_KxN)[0] % nm[1]:
    raise QuantError(f"{name}: {pattern} pruning needs the input size K={np.shape(w_KxN)[0]} "
                     f"divisible by {nm[1]}")
  q, u = _sparsegpt(jnp.asarray(w_KxN, jnp.float32), jnp.asarray(hessian_KxK, jnp.float32),
                    sparsity=float(sparsity), nm=nm, block_size=int(block_size), damp=float(damp))
  if not bool(jnp.all(jnp.isfinite(u))):
    raise QuantError(f"{name}: the Cholesky factorisation of the damped Hessian failed; raise "
                     f"damp (now {damp})")
  return q.astype(jnp.asarray(w_KxN).dtype)


def sparsity_of(w_KxN) -> float:
  """Fraction of exactly-zero weights."""
  w = np.asarray(w_KxN)
  return float(np.mean(w == 0))


def prune_model(model, method: str, *, sparsity: float = 0.5, pattern: str = "unstructured",
                calib_tokens=None, segment_ids_BxT=None, targets: str = DEFAULT_TARGETS,
                batch_size: int = 8, block_size: int = 128, damp: float = 0.01) -> dict[str, float]:
  """Prune every targeted Linear of the model's blocks in place.

  Args:
    model: a ``postrl.models.Transformer`` with float kernels.
    method: "magnitude", "wanda" or "sparsegpt".
    sparsity: fraction in [0, 1) (must be n/m with an N:M pattern).
    pattern: "unstructured" or "n:m" (e.g. "2:4": 2 zeros in every 4 consecutive inputs of an
      output).
    calib_tokens: int tokens [B, T]; required by wanda and sparsegpt (block-sequential
      calibration), unused by magnitude.
    segment_ids_BxT, batch_size: see ``calibrate.calibrate_sequential``.
    targets: regex over layer names (default: every Linear in the blocks).
    block_size, damp: SparseGPT's.
  Returns:
    {layer name: fraction of zero weights after pruning}.
  """
  if method not in METHODS:
    raise QuantError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
  parse_pattern(pattern, sparsity)
  chosen = target_layers(model, targets, "prune_model", include_quantized=True)
  quantized = [n for n, lin in chosen.items() if lin.quantized]
  if quantized:
    raise QuantError(f"prune_model: {quantized[0]} is quantized; prune float kernels (before "
                     f"quantizing)")
  if method != "magnitude" and calib_tokens is None:
    raise QuantError(f"pruning method {method!r} needs calibration data: pass calib_tokens "
                     f"(int token ids [B, T])")
  result = {}

  def apply(name, lin, new_w):
    lin.kernel[...] = jnp.asarray(new_w).astype(lin.kernel[...].dtype)
    result[name] = sparsity_of(lin.kernel[...])

  if method == "magnitude":
    for name, lin in chosen.items():
      apply(name, lin, magnitude_prune(lin.kernel[...], sparsity=sparsity, pattern=pattern,
                                       name=name))
    return result

  def compress(i, stats):
    for name, lin in block_linears(model, i).items():
      if name not in chosen:
        continue
      w = lin.kernel[...]
      if method == "wanda":
        new = wanda_prune(w, stats[name].sq_norm_K, sparsity=sparsity, pattern=pattern, name=name)
      else:
        new = sparsegpt_prune(w, stats[name].hessian_KxK, sparsity=sparsity, pattern=pattern,
                              block_size=block_size, damp=damp, name=name)
      apply(name, lin, new)

  calibrate_sequential(model, calib_tokens, compress, segment_ids_BxT=segment_ids_BxT,
                       batch_size=batch_size, with_hessian=method == "sparsegpt")
  return result
