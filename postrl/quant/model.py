"""Model-level quantization: replace ``Linear`` kernels by ``QuantizedWeight`` storage.

Which layers: a regex over module paths (``"layers.3.mlp.up_proj"``), ``re.search`` semantics.
The default takes every ``Linear`` in the decoder blocks; the token embedding and the output
projection (``lm_head`` or the tied embedding) stay float, as GPTQ (Frantar et al. 2023, §5) and
AWQ (Lin et al. 2024, §5.1) do.

How: a quantizer ``quantizer(name, w_KxN) -> QuantizedWeight`` per layer. The default is
round-to-nearest with a ``QuantSpec`` (``formats.QuantizedWeight.quantize``); GPTQ / AWQ pass their
own callable (which may also return a float [K, N] array: the kernel is then overwritten in float,
e.g. for fake-quantized or pruned weights).
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postrl.models.transformer import Linear
from postrl.quant.formats import QuantError, QuantizedWeight, QuantSpec, parse_spec

DEFAULT_TARGETS = r"(^|\.)layers\.\d+\."

SpecLike = QuantSpec | str
Quantizer = Callable[[str, jax.Array], "QuantizedWeight | jax.Array"]


def linear_layers(model: nnx.Module) -> dict[str, Linear]:
  """Every ``Linear`` of ``model`` by dotted path (``"layers.0.self_attn.q_proj"``)."""
  return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
          if isinstance(node, Linear)}


def quantized_layers(model: nnx.Module) -> dict[str, QuantizedWeight]:
  """The quantized kernels of ``model`` by the dotted path of their ``Linear``."""
  return {name: lin.kernel for name, lin in linear_layers(model).items() if lin.quantized}


def _compile_targets(targets: str):
  try:
    return re.compile(targets)
  except (re.error, TypeError) as e:
    raise QuantError(f"quantize_model: targets {targets!r} is not a valid regex ({e})") from None


def quantize_model(model: nnx.Module, spec_or_fn: SpecLike | Callable[[str], SpecLike | None] | None
                   = None, *, targets: str = DEFAULT_TARGETS, quantizer: Quantizer | None = None,
                   copy: bool = False) -> nnx.Module:
  """Replaces the kernels of the targeted ``Linear`` layers by quantized storage.

  Args:
    model: a ``Transformer`` (or any module holding ``Linear`` layers). Changed in place unless
      ``copy``.
    spec_or_fn: a ``QuantSpec`` or a name such as ``"int4_g128"`` (``parse_spec``), or a function
      ``path -> spec or None`` (None leaves that layer float: mixed precision). Used by the default
      RTN quantizer; may be None when ``quantizer`` is given.
    targets: regex searched in each ``Linear``'s dotted path; default: every Linear in the blocks.
    quantizer: ``quantizer(path, w_KxN float32) -> QuantizedWeight`` (or a float [K, N] array to
      write back as the float kernel). Default: round-to-nearest with the spec.
    copy: quantize a clone and leave ``model`` untouched.
  Returns:
    The quantized model (``model`` itself unless ``copy``).
  Raises:
    QuantError: a regex that matches no float Linear (the message names it), an invalid regex, a
      layer whose quantizer result does not fit (the message names the layer), a non-finite kernel.
  """
  if spec_or_fn is None and quantizer is None:
    raise QuantError("quantize_model needs a spec (e.g. 'int8', 'int4_g128', 'nf4') or a quantizer")
  if spec_or_fn is None:
    spec_fn = None
  elif callable(spec_or_fn):
    spec_fn = spec_or_fn
  else:
    fixed = parse_spec(spec_or_fn)  # a bad spec fails before any layer is touched
    spec_fn = lambda _name: fixed
  pattern = _compile_targets(targets)
  if copy:
    model = nnx.clone(model)
  layers = linear_layers(model)
  chosen = {n: lin for n, lin in layers.items() if pattern.search(n)}
  float_chosen = {n: lin for n, lin in chosen.items() if not lin.quantized}
  if not float_chosen:
    why = ("matches only already-quantized layers" if chosen else "matches no Linear layer")
    listed = ", ".join(list(layers)[:8]) + (", ..." if len(layers) > 8 else "")
    raise QuantError(f"quantize_model: targets regex {targets!r} {why}; Linear layers: "
                     f"{listed or '(none)'}")
  for name, lin in float_chosen.items():
    spec = None if spec_fn is None else spec_fn(name)
    if spec_fn is not None and spec is None:
      continue
    w_KxN = lin.kernel[...]
    names = lin.kernel.get_metadata().get("out_sharding") or lin.kernel.get_metadata().get(
        "sharding_names")
    if quantizer is None:
      result = QuantizedWeight.quantize(w_KxN, parse_spec(spec), names=names, name=name)
    else:
      result = quantizer(name, jnp.asarray(w_KxN, jnp.float32))
    lin.kernel = _checked_result(result, name, w_KxN, names)
  return model


def _checked_result(result, name, w_KxN, names):
  shape = tuple(w_KxN.shape)
  if isinstance(result, QuantizedWeight):
    if tuple(result.shape) != shape:
      raise QuantError(f"layer {name}: quantizer returned a QuantizedWeight of shape "
                       f"{list(result.shape)} for a kernel of shape {list(shape)}")
    return result if tuple(result.names) == tuple(names or (None, None)) else result.with_names(
        names)
  if isinstance(result, (jax.Array, np.ndarray)):
    if tuple(result.shape) != shape:
      raise QuantError(f"layer {name}: quantizer returned an array of shape "
                       f"{list(result.shape)} for a kernel of shape {list(shape)}")
    return nnx.Param(jnp.asarray(result, w_KxN.dtype), sharding_names=names, eager_sharding=False)
  raise QuantError(f"layer {name}: quantizer must return a QuantizedWeight or a [K, N] array, "
                   f"got {type(result).__name__}")


def dequantize_model(model: nnx.Module, *, dtype=None, copy: bool = False) -> nnx.Module:
  """Replaces every quantized kernel by its float dequantisation Ŵ (an ``nnx.Param`` in ``dtype``,
  default the model's ``param_dtype``): the float reference of a quantized model, and what
  ``save_pretrained`` can export."""
  if copy:
    model = nnx.clone(model)
  pdt = dtype or getattr(getattr(model, "config", None), "param_dtype", "float32")
  for lin in linear_layers(model).values():
    if lin.quantized:
      qw = lin.kernel
      lin.kernel = nnx.Param(qw.dequantize(jnp.dtype(pdt)), sharding_names=qw.names,
                             eager_sharding=False)
  return model


def model_nbytes(model: nnx.Module) -> int:
  """Bytes of every array the model stores: float parameters plus quantized storage (packed
  codes, scales, zero points). Works on abstract models (``nnx.eval_shape``) too."""
  total = 0
  for leaf in jax.tree.leaves(nnx.state(model)):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total
