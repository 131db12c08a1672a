"""Top-k / top-p / min-p sampling of one token per row over large vocabularies, without a sort.

    z = logits / temperature;  token ~ softmax(z) restricted to the kept set of
    ``postrl.sampling.generate.process_logits`` (top-k -> top-p renormalised over the top-k set ->
    min-p; ties at a boundary all kept);  temperature 0 = argmax

Public entry point: ``sample(key, logits_BxV, *, temperature, top_k, top_p, min_p, impl,
interpret) -> (token_B, model_logp_B)``, model_logp = log_softmax(logits)[token] (temperature 1,
no truncation: the plain model's log-prob that trainers use). Implementations (same distribution):

* ``reference.sample_reference``: ``process_logits`` (bisection thresholds) +
  ``jax.random.categorical`` (``impl="xla"``; the path on CPU, for top-k with top-p, plain
  temperature sampling and greedy).
* ``gpu.sample_gpu``: Pallas on the Triton backend (``sample_gpu`` here: the same behind argument
  checks), rejection sampling with a rising pivot
  (a Gumbel-max or inverse-CDF draw + one check pass per round, see ``gpu``; the launch settings
  by batch and rule: ``default_config``); rows that exhaust the rounds cap are
  sampled again by the reference, so the output distribution stays exact.
* ``reference.sort_sample``: the classic sort + cumulative-sum sampler (benchmark baseline only).

``impl="auto"`` runs the kernel on a single-device GPU at every batch for top-k, top-p or min-p
(not top-k with top-p), where an H100 measured it the fastest sampler at every point
(``GPU_MEASURED``; ``benchmarks/sampling.py``), XLA elsewhere (CPU, several devices, top-k with
top-p, plain temperature sampling, greedy). The kernel does not return the sampling log-prob (the
truncated distribution's normaliser needs the exact threshold): use
``postrl.sampling.generate.sample_token`` where that is needed.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from kernels import as_array
from kernels.sampling import gpu as _gpu
from kernels.sampling.gpu import GpuConfig, KernelShapeError, check_config, default_config
from kernels.sampling.reference import kept_mask, sample_reference, sort_sample
from postrl.sampling.generate import check_key

__all__ = ["sample", "choose_impl", "sample_reference", "sample_gpu", "sort_sample", "kept_mask",
           "GpuConfig", "KernelShapeError", "default_config"]

IMPLS = ("auto", "xla", "pallas", "pallas_gpu")


def _active(v: int, top_k, top_p, min_p):
  """The settings that change the distribution (k >= V, p = 1 and min_p = 0 do not)."""
  return (top_k if top_k is not None and top_k < v else None,
          top_p if top_p is not None and top_p < 1.0 else None,
          min_p if min_p is not None and min_p > 0.0 else None)


def _check_args(logits, temperature, top_k, top_p, min_p, impl, config, fn="sample"):
  if impl not in IMPLS:
    raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")
  if getattr(logits, "ndim", None) != 2:
    raise ValueError(f"{fn}: logits_BxV must be 2-D [B, V], got "
                     + (f"shape {logits.shape}" if hasattr(logits, "shape")
                        else type(logits).__name__))
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"{fn}: logits_BxV must be floating point, got {logits.dtype}")
  if logits.shape[1] < 1:
    raise ValueError(f"{fn}: logits_BxV has an empty vocabulary (V = 0)")
  # a bool is not a temperature; an infinite one makes -inf logits NaN (-inf / inf)
  if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
      or not 0 <= temperature < float("inf")):
    raise ValueError(f"{fn}: temperature must be a finite number >= 0 (0 = greedy), got "
                     f"{temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                            or top_k < 1):
    raise ValueError(f"{fn}: top_k must be an integer >= 1 or None, got {top_k!r}")
  if top_p is not None and not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
    raise ValueError(f"{fn}: top_p must be in (0, 1] or None, got {top_p!r}")
  if min_p is not None and not (isinstance(min_p, numbers.Real) and 0.0 <= min_p < 1.0):
    raise ValueError(f"{fn}: min_p must be in [0, 1) or None, got {min_p!r}")
  if config is not None:
    if not isinstance(config, GpuConfig):
      raise ValueError(f"{fn}: config must be a kernels.sampling.GpuConfig, got {config!r}")
    check_config(config)


def _empty_rows(*dtypes):
  return tuple(jnp.zeros((0,), d) for d in dtypes)


def sample_gpu(logits_BxV, seeds_B, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, min_p: float | None = None,
               config: GpuConfig | None = None, interpret: bool = False):
  """``gpu.sample_gpu`` (the Triton kernel alone: token_B, model_logp_B, rounds_B) behind the
  argument checks of ``sample``: [B, V] float logits, one integer seed per row, temperature > 0
  (greedy is not a kernel case: ``sample`` takes temperature 0), top_k >= 1, top_p in (0, 1],
  min_p in [0, 1) (k >= V, p = 1, min_p = 0: not applied). B = 0 gives empty outputs. Adds no
  operation to the kernel's program (``gpu.sample_gpu``'s docstring has the outputs)."""
  logits_BxV, seeds_B = as_array(logits_BxV), as_array(seeds_B)
  _check_args(logits_BxV, temperature, top_k, top_p, min_p, "pallas", config, fn="sample_gpu")
  if temperature == 0:
    raise ValueError("sample_gpu: temperature must be > 0 (greedy is not a kernel case: "
                     "sample(..., temperature=0) takes the argmax)")
  b = logits_BxV.shape[0]
  if (getattr(seeds_B, "shape", None) != (b,)
      or not jnp.issubdtype(seeds_B.dtype, jnp.integer)):
    raise ValueError(f"sample_gpu: seeds_B must be [B] = [{b}] integers (uint32 seeds, e.g. "
                     f"jax.random.bits(key, (B,))), got "
                     + (f"shape {tuple(seeds_B.shape)} and dtype {seeds_B.dtype}"
                        if hasattr(seeds_B, "dtype") else type(seeds_B).__name__))
  if b == 0:
    return _empty_rows(jnp.int32, jnp.float32, jnp.int32)
  return _gpu.sample_gpu(logits_BxV, seeds_B, temperature=temperature, top_k=top_k, top_p=top_p,
                         min_p=min_p, config=config, interpret=interpret)


# Measured on one H100 (benchmarks/sampling.py, docs/benchmarks.md). Second run, 2026-11-26, with
# the default GpuConfig (split path, fast_math): top-p at V = 152k, 31 / 61 / 155 / 476 us at
# B = 1 / 16 / 64 / 256 against XLA's best (radix search 98 us at B = 1, sort 767 / 2246 / 4491
# us above); the kernel was fastest at every top-p point (B 1-256, V 32k-152k), for top-k at
# B = 1 / 16 / 64 / 256 and for min-p alone at B = 64 (87 vs 133 us). "auto" follows that table.
GPU_MEASURED = True
KERNEL_MIN_BATCH = 1


def choose_impl(v: int, *, temperature: float, top_k: int | None = None,
                top_p: float | None = None, min_p: float | None = None, impl: str = "auto",
                platform: str | None = None, batch: int | None = None) -> str:
  """Resolve ``impl`` to "xla" or "pallas_gpu" for these settings and this platform.

  "auto" picks the kernel on a single GPU for top-k, top-p or min-p (not top-k with top-p) at
  ``batch`` >= ``KERNEL_MIN_BATCH`` (None: assumed large enough), XLA elsewhere: CPUs, meshes,
  greedy (temperature 0: XLA's argmax), plain temperature sampling (one Gumbel-max pass),
  top-k with top-p. These are where the kernel was measured faster (``GPU_MEASURED``;
  ``benchmarks/sampling.py``).
  "pallas" / "pallas_gpu" with top-k and top-p together raise ``KernelShapeError``.
  """
  if impl == "xla" or temperature == 0:
    return "xla"
  top_k, top_p, min_p = _active(v, top_k, top_p, min_p)
  if impl in ("pallas", "pallas_gpu"):
    if top_k is not None and top_p is not None:
      raise KernelShapeError("sample: top_k together with top_p is not a kernel case (the top-p "
                             "mass is renormalised over the top-k set): use impl='xla' or 'auto'")
    return "pallas_gpu"
  platform = platform or jax.default_backend()
  if not GPU_MEASURED or platform not in ("gpu", "cuda", "rocm") or jax.device_count() > 1:
    return "xla"
  if top_k is not None and top_p is not None:  # not a kernel case
    return "xla"
  if top_k is None and top_p is None and min_p is None:  # plain: XLA's one-pass Gumbel-max
    return "xla"
  if batch is not None and batch < KERNEL_MIN_BATCH:
    return "xla"
  return "pallas_gpu"


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p", "min_p", "impl",
                                             "interpret", "config"))
def _sample(key, logits_BxV, *, temperature, top_k, top_p, min_p, impl, interpret, config):
  settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  if impl == "xla":
    return sample_reference(key, logits_BxV, **settings)
  key_kernel, key_fallback = jax.random.split(key)
  seeds_B = jax.random.bits(key_kernel, logits_BxV.shape[:1], jnp.uint32)
  token, model_logp, _ = _gpu.sample_gpu(logits_BxV, seeds_B, config=config,
                                         interpret=interpret, **settings)
  failed = token < 0
  if config is None or config.max_rounds is None:
    # no rounds cap: -1 only for a row without a finite logit, where the reference's categorical
    # draw is token 0 (log-prob NaN); no data-dependent branch, so no host synchronisation
    return jnp.where(failed, 0, token), jnp.where(failed, jnp.nan, model_logp)

  def resample(_):  # rows whose rounds all rejected: an exact draw from the same kept set
    token_x, logp_x = sample_reference(key_fallback, logits_BxV, **settings)
    return jnp.where(failed, token_x, token), jnp.where(failed, logp_x, model_logp)

  return jax.lax.cond(jnp.any(failed), resample, lambda _: (token, model_logp), None)


def sample(key, logits_BxV, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, min_p: float | None = None, impl: str = "auto",
           interpret: bool = False, config: GpuConfig | None = None):
  """One token per row from softmax(logits / temperature) truncated by top-k / top-p / min-p.

  The kept set is ``process_logits``'s: top-k keeps tokens with fewer than k strictly above;
  top-p (Holtzman et al. 2020) keeps tokens whose strictly more probable tokens hold less than p
  of the (top-k renormalised) mass; min-p (Nguyen et al. 2024) keeps p_i >= min_p * max_j p_j.
  The kernel draws by rejection sampling with a rising pivot (FlashInfer, Ye et al. 2025; see
  ``kernels.sampling.gpu``): no sort, about two passes over the row per round.

  Args:
    key: one ``jax.random`` key (unused when greedy).
    logits_BxV: [B, V] logits (bf16 / f16 / f32; B = 0 gives empty outputs).
    temperature: finite, >= 0; 0 = greedy argmax (XLA, whatever ``impl``).
    top_k: integer >= 1 or None (k >= V: no truncation).
    top_p: in (0, 1] or None (1: no truncation).
    min_p: in [0, 1) or None (0: no truncation).
    impl: "auto" | "xla" | "pallas" (= "pallas_gpu", the Triton kernel).
    interpret: run the kernel in Pallas interpret mode (CPU tests; "auto" then picks XLA).
    config: ``GpuConfig`` of the kernel (block, max_rounds, warps); None: ``default_config``.
  Returns:
    (token_B int32, model_logp_B float32 = log_softmax(logits)[token] at temperature 1).
  """
  logits_BxV = as_array(logits_BxV)
  _check_args(logits_BxV, temperature, top_k, top_p, min_p, impl, config)
  if temperature != 0:
    check_key("sample", key)
  v = logits_BxV.shape[1]
  chosen = choose_impl(v, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       impl=impl, platform="cpu" if interpret and impl == "auto" else None,
                       batch=logits_BxV.shape[0])
  if chosen == "pallas_gpu" and not interpret and jax.default_backend() not in ("gpu", "cuda",
                                                                                "rocm"):
    raise ValueError(f"sample: impl={impl!r} runs the Triton kernel, which needs a GPU (backend is "
                     f"{jax.default_backend()!r}); use interpret=True to run it on CPU")
  top_k, top_p, min_p = _active(v, top_k, top_p, min_p)
  if chosen == "pallas_gpu" and logits_BxV.shape[0] == 0:  # no rows: no kernel grid
    return _empty_rows(jnp.int32, jnp.float32)
  return _sample(key, logits_BxV, temperature=float(temperature),
                 top_k=None if top_k is None else int(top_k),
                 top_p=None if top_p is None else float(top_p),
                 min_p=None if min_p is None else float(min_p), impl=chosen, interpret=interpret,
                 config=config)
