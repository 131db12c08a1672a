"""Lower a function with Pallas Triton kernels for CUDA on this CPU machine and run MLIR's verifier
on every Triton module it builds.

``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` builds each kernel's Triton IR but
never verifies it; an ill-typed module (e.g. a loop bound that became an i1) then fails only in
the GPU compile. ``cuda_lowering`` hooks the Pallas Triton lowering (jax is pinned in setup.py)
and verifies each module as it is built.
"""

from __future__ import annotations

import contextlib

import jax
from jax._src.pallas.triton import pallas_call_registration


@contextlib.contextmanager
def _verified(failures: list):
  lowering = pallas_call_registration.lowering
  original = lowering.lower_jaxpr_to_triton_module

  def verify(*args, **kwargs):
    result = original(*args, **kwargs)
    try:
      result.module.operation.verify()
    except Exception as e:  # noqa: BLE001 - MLIRError: collected, reported by the caller
      failures.append(f"{type(e).__name__}: {str(e)[:600]}")
    return result

  lowering.lower_jaxpr_to_triton_module = verify
  try:
    yield
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def cuda_lowering(f, *args) -> str:
  """The StableHLO text of ``f(*args)`` lowered for CUDA; raises AssertionError naming the first
  Triton module that MLIR's verifier rejects."""
  failures: list[str] = []
  with _verified(failures):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert not failures, failures[0]
  return text
