"""One decoder layer's cached one-token step (decoding a few rows) as five fused Pallas launches.

    n = RMSNorm(x);  q, k = RoPE(n W_q), RoPE(n W_k);  v = n W_v;  cache[b, pos_b] = (k, v)
    a = x + Attn(q, cache) W_o;   x' = a + W_down (silu(m W_gate) * m W_up),  m = RMSNorm(a)

(Llama / Qwen2 blocks, ``postrl.models.transformer``.) Public entry point:
``decode_layer(x_BxD, positions_B, inv_freq, weights, cache_k, cache_v, *, eps, dtype, impl,
interpret, config) -> (x', cache_k, cache_v)``. Implementations (the same function):

* ``reference.decode_layer_reference``: the model's own jnp arithmetic (``impl="xla"``).
* ``gpu.decode_layer_gpu``: Pallas on the Triton backend, five launches per layer instead of XLA's
  ~12 at batch 1 (``impl="pallas"``), for 1 to 16 rows and float weights.
* one half fused, the other XLA's: ``impl="pallas_attention"`` (the kernels' launches 1-3,
  ``gpu.attention_half_gpu``, then ``reference.mlp_half_reference``) and ``impl="pallas_mlp"``
  (``reference.attention_half_reference``, its attention by ``attention_impl``, then the
  kernels' launches 4-5, ``gpu.mlp_half_gpu``). The fused MLP streams three quarters of a small
  model's weights through 16-column programs, XLA through tuned GEMMs; a GPU run that times them
  beside XLA's layer tells which half the kernels win (``benchmarks/decode_block.py``).
* ``persistent.decode_layer_persistent``: the same five phases in ONE launch (``impl=
  "pallas_persistent"``): resident programs wait for each other at a barrier across the grid
  (an atomic counter) between the phases, so a layer costs one launch and four barriers.
  ``decode_layers`` runs a step's layers and passes the barrier state from one to the next.

Why: at batch 1 the SmolLM2-135M decode step is bound by its number of launches (399 per step,
~2.7 us each on an H200: 6.9% of the bandwidth bound; docs/benchmarks.md). Not yet timed on a GPU,
so ``impl="auto"`` (``ModelConfig.decode_block_impl``'s default) keeps XLA's layer everywhere until
a GPU run shows the kernels faster (``GPU_MEASURED``; ``GPU_IMPL`` is then the fastest of the three
kernel implementations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.decode_block.gpu import (GpuConfig, KernelShapeError, attention_half_gpu, check_shapes,
                                      decode_layer_gpu, default_config, mlp_half_gpu)
from kernels.decode_block.persistent import (barrier_timeouts, decode_layer_persistent,
                                             new_sync)
from kernels.decode_block.reference import (attention_half_reference, decode_layer_reference,
                                            mlp_half_reference)

__all__ = ["decode_layer", "decode_layers", "decode_layer_persistent", "barrier_timeouts",
           "new_sync", "choose_impl", "check_shapes", "default_config", "decode_layer_reference",
           "decode_layer_gpu", "attention_half_gpu", "mlp_half_gpu", "attention_half_reference",
           "mlp_half_reference", "GpuConfig", "KernelShapeError", "WEIGHT_NAMES", "BIAS_GROUPS"]

# the implementations that run kernels: the whole layer (five launches, or one persistent launch),
# or its attention / MLP half
KERNEL_IMPLS = ("pallas", "pallas_attention", "pallas_mlp", "pallas_persistent")
IMPLS = ("auto", "xla") + KERNEL_IMPLS
# Not timed on a GPU yet (compiled for sm_90 and launch-counted without one): "auto" keeps XLA.
GPU_MEASURED = False
# what "auto" takes on one GPU once GPU_MEASURED: the fastest of KERNEL_IMPLS in that run
GPU_IMPL = "pallas"
WEIGHT_NAMES = ("input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down")
# optional biases, each group all present or all absent
BIAS_GROUPS = (("q_bias", "k_bias", "v_bias"), ("o_bias",), ("gate_bias", "up_bias", "down_bias"))


def choose_impl(impl: str = "auto", platform: str | None = None) -> str:
  """Resolve ``impl`` to "xla" or one of ``KERNEL_IMPLS`` ("auto": ``GPU_IMPL`` on one GPU once
  ``GPU_MEASURED``; XLA until then and on CPUs, TPUs and several devices)."""
  if impl not in IMPLS:
    raise ValueError(f"decode_layer: impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if GPU_MEASURED and platform in ("gpu", "cuda") and jax.device_count() == 1:
    return GPU_IMPL
  return "xla"


def _check_weights(weights: dict, D: int, H: int, K: int, Dh: int):
  if not isinstance(weights, dict):
    raise ValueError(f"decode_layer: weights must be a dict of arrays, got {type(weights).__name__}")
  missing = [n for n in WEIGHT_NAMES if n not in weights]
  if missing:
    raise ValueError(f"decode_layer: weights lacks {missing}")
  known = set(WEIGHT_NAMES).union(*BIAS_GROUPS)
  unknown = sorted(set(weights) - known)
  if unknown:
    raise ValueError(f"decode_layer: unknown weights {unknown}; expected {sorted(known)}")
  for group in BIAS_GROUPS:
    present = [n for n in group if n in weights]
    if present and len(present) != len(group):
      raise ValueError(f"decode_layer: biases {list(group)} go together; got only {present}")
  F = weights["gate"].shape[-1] if getattr(weights["gate"], "ndim", 0) == 2 else None
  expected = {"input_norm": (D,), "q": (D, H * Dh), "k": (D, K * Dh), "v": (D, K * Dh),
              "o": (H * Dh, D), "post_norm": (D,), "gate": (D, F), "up": (D, F),
              "down": (F, D), "q_bias": (H * Dh,), "k_bias": (K * Dh,), "v_bias": (K * Dh,),
              "o_bias": (D,), "gate_bias": (F,), "up_bias": (F,), "down_bias": (D,)}
  for name, w in weights.items():
    shape = getattr(w, "shape", None)
    if shape != expected[name]:
      raise ValueError(f"decode_layer: weights[{name!r}] has shape {shape}, expected "
                       f"{expected[name]} (D={D}, H={H}, K={K}, head_dim={Dh}, F={F})")
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise ValueError(f"decode_layer: weights[{name!r}] must be floating point, got {w.dtype} "
                       "(quantized layers run XLA's layer)")


def _check_inputs(x_BxD, positions_B, weights, cache_k, cache_v, config):
  """Raise ValueError naming what ``decode_layer`` cannot take (before any kernel is traced)."""
  for name, a, nd in (("x_BxD", x_BxD, 2), ("positions_B", positions_B, 1),
                      ("cache_k", cache_k, 4), ("cache_v", cache_v, 4)):
    if getattr(a, "ndim", None) != nd:
      raise ValueError(f"decode_layer: {name} must be {nd}-D, got shape {getattr(a, 'shape', None)}")
  if not jnp.issubdtype(positions_B.dtype, jnp.integer):
    raise ValueError(f"decode_layer: positions_B must be integers, got {positions_B.dtype}")
  B, D = x_BxD.shape
  if cache_k.shape != cache_v.shape or cache_k.shape[0] != B or positions_B.shape != (B,):
    raise ValueError(f"decode_layer: x {x_BxD.shape}, positions {positions_B.shape}, cache_k "
                     f"{cache_k.shape} and cache_v {cache_v.shape} do not agree on B")
  K, Dh = cache_k.shape[2:]
  q = weights.get("q") if isinstance(weights, dict) else None
  if getattr(q, "ndim", 0) != 2 or q.shape[1] % Dh:
    raise ValueError(f"decode_layer: weights['q'] must be [D, H * {Dh}], got "
                     f"{getattr(q, 'shape', None)}")
  _check_weights(weights, D, q.shape[1] // Dh, K, Dh)
  if config is not None and not isinstance(config, GpuConfig):
    raise ValueError(f"decode_layer: config must be a kernels.decode_block.GpuConfig, got "
                     f"{config!r}")


def decode_layer(x_BxD, positions_B, inv_freq, weights: dict, cache_k, cache_v, *, eps: float,
                 dtype=jnp.bfloat16, impl: str = "auto", interpret: bool = False,
                 config: GpuConfig | None = None, attention_impl: str = "xla"):
  """One decoder layer at one cached decode step:

      a = x + Attn(RoPE(n W_q), cache + RoPE(n W_k), cache + n W_v) W_o,   n = RMSNorm(x)
      x' = a + W_down (silu(m W_gate) * m W_up),                           m = RMSNorm(a)

  (Touvron et al. 2023; the model's ``Block``; flash-decoding attention, Dao et al. 2023.)

  Args:
    x_BxD: the residual stream of each row's one new token.
    positions_B: int position (= cache slot) of that token; slots 0 .. position are attended.
    inv_freq: [Dh / 2] RoPE inverse frequencies (``transformer.rope_inv_freq``).
    weights: ``WEIGHT_NAMES`` ([in, out] matrices as the model stores them, norm weights) and
      optional ``BIAS_GROUPS``.
    cache_k, cache_v: [B, S, K, Dh] caches; the token's key / value are written at its slot.
    eps: RMSNorm epsilon. dtype: the compute dtype (the model's ``dtype``).
    impl: "auto" | "xla" | "pallas" | "pallas_attention" | "pallas_mlp" | "pallas_persistent"
      (module doc; the persistent layer here starts from a zeroed barrier state: one small memset
      per call, which ``decode_layers`` saves).
      interpret: the kernels in Pallas interpret mode (CPU tests).
    config: ``GpuConfig`` (None: ``default_config`` of the shapes).
    attention_impl: how an attention half that XLA runs (``impl`` "xla" or "pallas_mlp")
      computes attention: "xla", the exact masked reference (default); "auto" / "pallas",
      ``kernels.decode_attention`` as the model's cached step does
      (``ModelConfig.decode_attention_impl``; the kernel on one GPU). The fused attention half
      always runs the kernel.
  Returns:
    (x' [B, D] in ``dtype``, cache_k, cache_v).
  """
  return _layer(x_BxD, positions_B, inv_freq, weights, cache_k, cache_v, eps=eps, dtype=dtype,
                impl=impl, interpret=interpret, config=config, attention_impl=attention_impl)[:3]


def _layer(x_BxD, positions_B, inv_freq, weights, cache_k, cache_v, *, eps, dtype, impl,
           interpret, config, attention_impl, sync=None):
  """``decode_layer`` -> (x', cache_k, cache_v, sync): the persistent layer takes ``sync`` (None:
  ``new_sync()``) and returns its own; the others pass it through."""
  _check_inputs(x_BxD, positions_B, weights, cache_k, cache_v, config)
  chosen = choose_impl(impl, platform="cpu" if interpret and impl == "auto" else None)
  if chosen == "xla":
    return decode_layer_reference(x_BxD, positions_B, inv_freq, weights, cache_k, cache_v,
                                  eps=eps, dtype=dtype, attention_impl=attention_impl,
                                  interpret=interpret) + (sync,)
  if not interpret and jax.default_backend() not in ("gpu", "cuda"):
    raise ValueError(f"decode_layer: impl={chosen!r} runs Triton kernels, which need an NVIDIA "
                     f"GPU (backend is {jax.default_backend()!r}); use interpret=True on a CPU")
  if chosen == "pallas_persistent":
    return decode_layer_persistent(x_BxD, positions_B, inv_freq, weights, cache_k, cache_v,
                                   eps=eps, dtype=dtype, config=config, interpret=interpret,
                                   sync=sync)[:4]  # (a trace, with config.trace, is dropped)
  if chosen == "pallas":
    return decode_layer_gpu(x_BxD, positions_B, inv_freq, weights, cache_k, cache_v, eps=eps,
                            dtype=dtype, config=config, interpret=interpret) + (sync,)
  if chosen == "pallas_attention":
    a, cache_k, cache_v = attention_half_gpu(x_BxD, positions_B, inv_freq, weights, cache_k,
                                             cache_v, eps=eps, dtype=dtype, config=config,
                                             interpret=interpret)
    return mlp_half_reference(a, weights, eps=eps, dtype=dtype), cache_k, cache_v, sync
  a, cache_k, cache_v = attention_half_reference(x_BxD, positions_B, inv_freq, weights, cache_k,
                                                 cache_v, eps=eps, dtype=dtype,
                                                 attention_impl=attention_impl,
                                                 interpret=interpret)
  return (mlp_half_gpu(a, weights, eps=eps, dtype=dtype, config=config, interpret=interpret),
          cache_k, cache_v, sync)


def decode_layers(x_BxD, positions_B, inv_freq, layers, caches_k, caches_v, *, eps: float,
                  dtype=jnp.bfloat16, impl: str = "auto", interpret: bool = False,
                  config: GpuConfig | None = None, attention_impl: str = "xla", sync=None):
  """All layers of one cached decode step: ``decode_layer`` on each (``layers``: a weights dict
  per layer, ``caches_k`` / ``caches_v``: a [B, S, K, Dh] cache per layer) -> (x' [B, D], caches_k,
  caches_v, sync). With ``impl="pallas_persistent"`` the barrier state (``sync``, None: a zeroed
  one, ``new_sync()``) goes from each layer's launch to the next, and the one returned says
  whether a barrier gave up (``barrier_timeouts(sync)``: 0 when the result is right); other
  implementations return ``sync`` as given."""
  if not len(layers) == len(caches_k) == len(caches_v):
    raise ValueError(f"decode_layers: {len(layers)} layers, {len(caches_k)} k caches and "
                     f"{len(caches_v)} v caches")
  new_k, new_v = [], []
  for w, ck, cv in zip(layers, caches_k, caches_v):
    x_BxD, ck, cv, sync = _layer(x_BxD, positions_B, inv_freq, w, ck, cv, eps=eps, dtype=dtype,
                                 impl=impl, interpret=interpret, config=config,
                                 attention_impl=attention_impl, sync=sync)
    new_k.append(ck)
    new_v.append(cv)
  return x_BxD, new_k, new_v, sync
