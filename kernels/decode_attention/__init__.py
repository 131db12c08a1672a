"""Attention of one decode step over a KV cache, reading only each row's valid slots.

    out[b, h] = sum_{s < L_b} softmax_s(q[b, h] . k[b, s, h // G] / sqrt(D)) v[b, s, h // G]

Public entry point: ``decode_attention(q_BxHxD, k_BxSxKxD, v_BxSxKxD, lengths_B, *, impl,
interpret, config) -> [B, H, D]``. Implementations (the same function):

* ``reference.decode_attention_reference``: ``postrl.models.transformer.dot_product_attention``
  with the mask slot < L_b, reading all S slots (``impl="xla"``; what the model's cached decode
  does on CPUs and several devices).
* ``gpu.decode_attention_gpu``: Pallas on the Triton backend, flash-decoding over chunks of the
  valid slots, one kernel plus one small XLA fusion (``impl="pallas"``). Checked and timed on an
  H100: faster than XLA's masked einsum at every shape timed, so ``impl="auto"`` uses it on one
  GPU and XLA elsewhere (``GPU_MEASURED``).

Used by the model's cached one-token steps through ``ModelConfig.decode_attention_impl``
("auto" by default: the kernel on one GPU; "xla"; "pallas").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import as_array
from kernels.decode_attention.gpu import GpuConfig, KernelShapeError, decode_attention_gpu
from kernels.decode_attention.reference import decode_attention_reference

__all__ = ["decode_attention", "choose_impl", "decode_attention_reference",
           "decode_attention_gpu", "GpuConfig", "KernelShapeError"]

IMPLS = ("auto", "xla", "pallas")
# Checked and timed on an H100 (benchmarks/decode_attention.py, 2026-11-26): equal to the reference
# and faster than XLA's masked einsum at all 22 shapes timed (135M / 1B heads, B 1-256, S 320-8192,
# half the slots valid): 1.05-1.33x at B = 1, S = 320, up to 6.1x at B = 256, S = 8192. "auto"
# uses it on one GPU.
GPU_MEASURED = True


def choose_impl(impl: str = "auto", platform: str | None = None) -> str:
  """Resolve ``impl`` to "xla" or "pallas" ("auto": the kernel on one GPU, where it was measured
  faster; XLA on CPUs and with several devices)."""
  if impl not in IMPLS:
    raise ValueError(f"decode_attention: impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if GPU_MEASURED and platform in ("gpu", "cuda", "rocm") and jax.device_count() == 1:
    return "pallas"
  return "xla"


def decode_attention(q_BxHxD, k_BxSxKxD, v_BxSxKxD, lengths_B, *, impl: str = "auto",
                     interpret: bool = False, config: GpuConfig | None = None):
  """One query per row against the first ``lengths_B[b]`` (>= 1) slots of its cache:

      out[b, h] = sum_{s < L_b} softmax_s(q[b, h] . k[b, s, h // G] / sqrt(D)) v[b, s, h // G]

  (G = H / K grouped query heads; flash-decoding, Dao et al. 2023, for the kernel).

  Args:
    q_BxHxD: queries (any float dtype; cast to the cache dtype as the model's einsum does).
    k_BxSxKxD, v_BxSxKxD: the float cache (S >= 1 slots), K key/value heads (H a multiple of K:
      grouped queries).
    lengths_B: integer valid slots per row, in [1, S]; slots at or past it are never read by the
      kernel. A row whose length lies outside [1, S] has no valid answer: its output is NaN in
      both implementations (the kernel never reads past the cache). Lengths are data (traced in
      a decode loop), so they are not checked on the host.
    impl: "auto" | "xla" | "pallas".
    interpret: run the kernel in Pallas interpret mode (CPU tests).
    config: ``GpuConfig`` (block of slots, chunks per row and head, warps).
  Returns:
    [B, H, D] in the cache dtype.
  """
  q_BxHxD, k_BxSxKxD, v_BxSxKxD, lengths_B = map(as_array, (q_BxHxD, k_BxSxKxD, v_BxSxKxD,
                                                            lengths_B))
  for name, x, nd in (("q_BxHxD", q_BxHxD, 3), ("k_BxSxKxD", k_BxSxKxD, 4),
                      ("v_BxSxKxD", v_BxSxKxD, 4), ("lengths_B", lengths_B, 1)):
    if getattr(x, "ndim", None) != nd:
      raise ValueError(f"decode_attention: {name} must be {nd}-D, got shape "
                       f"{getattr(x, 'shape', None)}")
  for name, x in (("q_BxHxD", q_BxHxD), ("k_BxSxKxD", k_BxSxKxD), ("v_BxSxKxD", v_BxSxKxD)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"decode_attention: {name} must be floating point, got {x.dtype}")
  if not jnp.issubdtype(lengths_B.dtype, jnp.integer):
    # a float length is compared as a float by the reference and truncated by the kernel
    raise ValueError(f"decode_attention: lengths_B must be integers, got {lengths_B.dtype}")
  B, H, D = q_BxHxD.shape
  if k_BxSxKxD.shape != v_BxSxKxD.shape or k_BxSxKxD.shape[0] != B or k_BxSxKxD.shape[3] != D:
    raise ValueError(f"decode_attention: q {q_BxHxD.shape}, k {k_BxSxKxD.shape} and v "
                     f"{v_BxSxKxD.shape} do not agree on [B, S, K, D]")
  S, K = k_BxSxKxD.shape[1:3]
  if K < 1 or H % K:
    raise ValueError(f"decode_attention: the {H} query heads of q_BxHxD must be a multiple of the "
                     f"{K} key/value heads of the cache (grouped queries)")
  if S < 1:
    raise ValueError("decode_attention: the cache has no slots (S = 0): lengths must be in [1, S]")
  if lengths_B.shape != (B,):
    raise ValueError(f"decode_attention: lengths_B has shape {lengths_B.shape}, expected ({B},)")
  if config is not None and not isinstance(config, GpuConfig):
    raise ValueError(f"decode_attention: config must be a kernels.decode_attention.GpuConfig, got "
                     f"{config!r}")
  chosen = choose_impl(impl, platform="cpu" if interpret and impl == "auto" else None)
  if chosen == "xla" or B == 0:  # B = 0: no kernel grid
    out = decode_attention_reference(q_BxHxD, k_BxSxKxD, v_BxSxKxD, lengths_B)
  else:
    if not interpret and jax.default_backend() not in ("gpu", "cuda", "rocm"):
      raise ValueError(f"decode_attention: impl='pallas' runs the Triton kernel, which needs a GPU "
                       f"(backend is {jax.default_backend()!r}); use interpret=True to run it on "
                       "CPU")
    # never past the cache: a length beyond S would read other rows' memory
    out = decode_attention_gpu(q_BxHxD, k_BxSxKxD, v_BxSxKxD, jnp.clip(lengths_B, 0, S),
                               config=config, interpret=interpret)
  valid_B = (lengths_B >= 1) & (lengths_B <= S)
  return jnp.where(valid_B[:, None, None], out, jnp.nan).astype(out.dtype)
