"""Fused beam step: the K best continuations of every beam, and the per-row log-softmax top-k.

    cand[b, w, v] = S[b, w] + log_softmax(logits[b, w])[v]
    (values, flat) = top_k(cand[b] over all W x V, K),  beam = flat // V,  token = flat % V

Public entry points: ``beam_step(logits_BxWxV, scores_BxW, k, *, impl, interpret, config)`` and
``log_softmax_topk(logits_RxV, k, ...)``, the per-row op the kernel implements (the k largest
log-probabilities of each row and its log-sum-exp: also what top-k sampling needs).
Implementations (same results up to float rounding; the same tie rule):

* ``reference``: log_softmax + add + ``lax.top_k`` over the flattened W x V array (``impl="xla"``;
  the path on CPU, TPU and meshes).
* ``gpu``: Pallas on the Triton backend. One pass over the logits per (beam row, vocabulary
  chunk) keeps an online log-sum-exp and a running top-K of the raw logits (a per-row shift does
  not change a row's order); XLA then merges the W x K row candidates of each batch row (tiny).

``impl="auto"`` takes the kernel on a single GPU when k <= 32 and XLA elsewhere (a kernel call
inside a sharded program would gather its operands). Measured on an H100 at one shape
(``benchmarks/beam_step.py``, 2026-11-26: B = 1, W = 4, V = 152k, 44 vs 494 us, the same picks);
the other shapes are still to be timed."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels import as_array
from kernels.beam_step.gpu import (MAX_K, GpuConfig, beam_step_gpu, default_config,
                                   log_softmax_topk_gpu, topk_partials_gpu)
from kernels.beam_step.reference import BeamStep, beam_step_reference, log_softmax_topk_reference

__all__ = ["beam_step", "log_softmax_topk", "BeamStep", "beam_step_reference",
           "log_softmax_topk_reference", "beam_step_gpu", "log_softmax_topk_gpu",
           "topk_partials_gpu", "GpuConfig", "default_config", "choose_impl", "MAX_K", "IMPLS"]

IMPLS = ("auto", "xla", "pallas")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


class TopK(NamedTuple):
  """``log_softmax_topk`` output: the k largest log-probabilities of each row, best first."""
  values_RxK: jax.Array  # float32 log p
  index_RxK: jax.Array   # int32 token ids
  lse_R: jax.Array       # float32 log sum exp logits


# First GPU run, one H100, 2026-11-26 (benchmarks/beam_step.py, docs/benchmarks.md): six compiled
# checks against the reference passed (odd vocabularies, splits, ties, -inf, bf16, k up to 32),
# and at B = 1, W = 4, V = 152k the kernel + merge took 44 us against XLA's 494 us (11.2x, the
# same picks). Other shapes were cut by the run's time limit.
GPU_MEASURED = True


def choose_impl(k: int, *, impl: str = "auto", platform: str | None = None,
                interpret: bool = False) -> str:
  """Resolve ``impl`` to "xla" or "pallas": "auto" is the Triton kernel on a single GPU for
  k <= ``MAX_K`` once ``GPU_MEASURED`` (the kernel compiled, checked and faster on a GPU in
  ``benchmarks/beam_step.py``), XLA elsewhere (CPU, TPU, several devices, larger k)."""
  if impl != "auto":
    return impl
  if interpret:
    return "xla"  # interpret mode is a test of the kernel, asked for with impl="pallas"
  platform = platform or jax.default_backend()
  if (not GPU_MEASURED or platform not in _GPU_PLATFORMS or jax.device_count() > 1
      or k > MAX_K):
    return "xla"
  return "pallas"


def _kernel_config(config, rows: int, v: int, fn: str):
  """The kernel's tiling: ``config`` (checked to be a ``GpuConfig``), else ``default_config``
  with blocks of at least 16 tokens (Triton's smallest; the tail past V is masked), which a
  vocabulary under 9 tokens would otherwise round down to and then refuse."""
  if config is not None:
    if not isinstance(config, GpuConfig):
      raise ValueError(f"{fn}: config must be a kernels.beam_step.GpuConfig, got {config!r}")
    return config
  cfg = default_config(rows, v)
  if cfg.block_v < 16:
    cfg = dataclasses.replace(cfg, block_v=16, splits=1)
  return cfg


def _check_common(logits, k, impl, interpret, fn):
  if impl not in IMPLS:
    raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")
  if not hasattr(logits, "dtype"):
    raise ValueError(f"{fn}: logits must be an array, got {type(logits).__name__}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"{fn}: logits must be a float array (bf16 / f16 / f32), got {logits.dtype}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"{fn}: k must be an int (static), got {k!r}")
  if impl == "pallas":
    if k > MAX_K:
      raise ValueError(f"{fn}: k={k} > {MAX_K}: the Triton kernel keeps at most {MAX_K} "
                       f"candidates per row (use impl='xla' or 'auto')")
    if not interpret and jax.default_backend() not in _GPU_PLATFORMS:
      raise ValueError(f"{fn}: impl='pallas' runs the Triton kernel, which needs a GPU (backend "
                       f"is {jax.default_backend()!r}); use interpret=True to run it on CPU")


def beam_step(logits_BxWxV, scores_BxW, k: int, *, impl: str = "auto", interpret: bool = False,
              config: GpuConfig | None = None) -> BeamStep:
  """The K best (beam, token) pairs by S_w + log_softmax(logits_w)[v], over all W x V pairs.

  One step of token-level beam search (Graves 2012; Wu et al. 2016, GNMT): K = 2W candidates
  keep W alive after EOS candidates finish. Ties go to the smaller flat index w V + v, as
  ``lax.top_k`` on the flattened array. -inf logits (masked tokens) and -inf scores (dead beams)
  give -inf candidates, ranked after every finite one. A NaN or +inf score, or NaN / +inf logits,
  in any beam of a batch row make all K values of that row NaN (its beams and tokens are then
  unspecified): the implementations rank NaN differently (``lax.top_k`` first, the kernel's merge
  drops the beam), and neither may pass a broken model's step for a clean one.

  Args:
    logits_BxWxV: next-token logits of each beam (bf16 / f16 / f32; float32 inside).
    scores_BxW: the beams' summed log-probs S (any real dtype, float32 inside; -inf = dead).
    k: candidates kept per batch row, 1 <= k <= W V (<= 32 for the kernel).
    impl: "auto" | "xla" | "pallas" (the Triton kernel; module doc).
    interpret: run the kernel in Pallas interpret mode (CPU tests; with impl="pallas").
    config: the kernel's ``GpuConfig`` (default: ``default_config``).
  Returns:
    ``BeamStep(values_BxK float32, beam_BxK int32, token_BxK int32, lse_BxW float32)``, best
    first; lse is each beam row's log sum_v exp logits.
  """
  logits_BxWxV, scores_BxW = as_array(logits_BxWxV), as_array(scores_BxW)
  _check_common(logits_BxWxV, k, impl, interpret, "beam_step")
  k = int(k)
  if getattr(logits_BxWxV, "ndim", None) != 3:
    raise ValueError(f"beam_step: logits_BxWxV must be 3-D [B, W, V], got shape "
                     f"{getattr(logits_BxWxV, 'shape', None)}")
  b, w, v = logits_BxWxV.shape
  if tuple(getattr(scores_BxW, "shape", ())) != (b, w):
    raise ValueError(f"beam_step: scores_BxW must be [B, W] = [{b}, {w}] like the logits, got "
                     f"{tuple(getattr(scores_BxW, 'shape', ()))}")
  if not (jnp.issubdtype(scores_BxW.dtype, jnp.floating)
          or jnp.issubdtype(scores_BxW.dtype, jnp.integer)):
    raise ValueError(f"beam_step: scores_BxW must be real numbers, got {scores_BxW.dtype}")
  if not 1 <= k <= w * v:
    raise ValueError(f"beam_step: k must be in [1, W x V] = [1, {w * v}], got {k}")
  if choose_impl(k, impl=impl, interpret=interpret) == "xla" or b == 0:  # b = 0: no kernel grid
    out = beam_step_reference(logits_BxWxV, scores_BxW, k)
  else:
    out = BeamStep(*beam_step_gpu(logits_BxWxV, scores_BxW, k, interpret=interpret,
                                  config=_kernel_config(config, b * w, v, "beam_step")))
  # a NaN / +inf score or log-sum-exp anywhere in a batch row: its values NaN in both paths
  s = scores_BxW.astype(jnp.float32)
  bad_B = jnp.any(jnp.isnan(s) | (s == jnp.inf) | jnp.isnan(out.lse_BxW) | (out.lse_BxW == jnp.inf),
                  axis=1)
  return out._replace(values_BxK=jnp.where(bad_B[:, None], jnp.nan, out.values_BxK))


def log_softmax_topk(logits_RxV, k: int, *, impl: str = "auto", interpret: bool = False,
                     config: GpuConfig | None = None) -> TopK:
  """The k largest log_softmax(logits)[v] of each row, their token ids and the row's log-sum-exp.

  log p(v) = x_v - lse,  lse = log sum_v exp x_v; ties go to the smaller index (``lax.top_k``);
  a row of -inf logits has lse = -inf and -inf values (token ids 0..k-1); a row with a NaN or +inf
  logit has NaN values (token ids 0..k-1), in both implementations.

  Args:
    logits_RxV: logits [..., V] (leading dims kept; bf16 / f16 / f32, float32 inside).
    k: 1 <= k <= V (<= 32 for the kernel).
    impl, interpret, config: as in ``beam_step``.
  Returns:
    ``TopK(values [..., k] float32, index [..., k] int32, lse [...] float32)``.
  """
  logits_RxV = as_array(logits_RxV)
  _check_common(logits_RxV, k, impl, interpret, "log_softmax_topk")
  k = int(k)
  if getattr(logits_RxV, "ndim", 0) < 1:
    raise ValueError("log_softmax_topk: logits_RxV must have a vocabulary axis [..., V]")
  lead, v = logits_RxV.shape[:-1], logits_RxV.shape[-1]
  if not 1 <= k <= v:
    raise ValueError(f"log_softmax_topk: k must be in [1, V] = [1, {v}], got {k}")
  rows = int(np.prod(lead))
  if choose_impl(k, impl=impl, interpret=interpret) == "xla" or rows == 0:  # 0: no kernel grid
    values, index, lse = log_softmax_topk_reference(logits_RxV, k)
  else:
    values, index, lse = log_softmax_topk_gpu(
        logits_RxV.reshape(-1, v), k, interpret=interpret,
        config=_kernel_config(config, rows, v, "log_softmax_topk"))
    values, index, lse = values.reshape(*lead, k), index.reshape(*lead, k), lse.reshape(lead)
  # NaN / +inf logits: values NaN, ids 0..k-1 in both paths (the kernel's would be past V)
  bad = (jnp.isnan(lse) | (lse == jnp.inf))[..., None]
  return TopK(jnp.where(bad, jnp.nan, values),
              jnp.where(bad, jnp.arange(k, dtype=jnp.int32), index), lse)
