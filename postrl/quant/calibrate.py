"""Calibration statistics of every Linear in a model's blocks, optionally block-sequential.

For each ``Linear`` inside ``model.layers`` (named by module path, ``"layers.3.self_attn.q_proj"``)
the calibration pass collects, over the real (non-padding) calibration tokens x_t in R^K read by
that layer:

    H      = 2 X^T X / n          [K, K] float32   (GPTQ / SparseGPT Hessian of ||W X - W' X||^2;
                                                   Frantar et al. 2023, Frantar & Alistarh 2023)
    mean_abs_j = mean_t |x_tj|   [K]              (AWQ's activation scale s_X; Lin et al. 2024)
    max_abs_j  = max_t |x_tj|    [K]              (SmoothQuant's max|X_j|; Xiao et al. 2023)
    sq_norm_j  = sum_t x_tj^2    [K]              (Wanda's ||X_j||_2^2; Sun et al. 2024)
    n          = number of tokens

Sequential mode (``calibrate_sequential``) follows the reference GPTQ / SparseGPT / Wanda code:
blocks are processed in order; the inputs of block i are the outputs of blocks < i *after* they
were compressed by the ``compress_block(block_index, stats)`` callback, so each block is
calibrated on what the compressed model will actually feed it. Within a block every layer sees
the block's uncompressed weights (the reference default; GPTQ's ``--true-sequential`` option,
which re-runs the block between q/k/v, o, gate/up and down, is not implemented).

Memory: the hidden states entering the current block for all calibration tokens are kept
(B*T*D values, twice while the block's outputs are produced: 2 x 32 x 256 x 576 x 4 B = 38 MB
for SmolLM2-135M); activations inside a block exist only for one chunk of ``batch_size``
sequences at a time; the statistics of one block (7 Hessians, 12 MB for SmolLM2-135M) are alive
until the callback returns. With ``keep_inputs=n`` each layer also keeps (at most) n of its input
rows, float32 [n, K] (AWQ's grid search needs them). ``calibrate`` (non-sequential) returns the
statistics of every layer at once: ~30 x 12 MB = 360 MB for SmolLM2-135M.

How inputs are captured: the block is run under ``jax.jit`` with ``Linear.__call__`` wrapped
while it is traced, so the statistics are reduced inside the compiled function and no layer's
full activations leave it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import re
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postrl.models.config import dtype_from_name
from postrl.models.transformer import Linear, positions_from_segments, rope_inv_freq
from postrl.quant.formats import QuantError


@dataclasses.dataclass
class LayerStats:
  """Input statistics of one Linear over the calibration tokens (see the module docstring).

  Attributes:
    hessian_KxK: H = 2 X^T X / n, float32 (None when not asked for: ``with_hessian=False``).
    mean_abs_K: mean_t |x_tj|.
    max_abs_K: max_t |x_tj|.
    sq_norm_K: sum_t x_tj^2 (so ||X_j||_2 = sqrt(sq_norm_K)).
    num_tokens: n.
    inputs_NxK: up to ``keep_inputs`` input rows (float32), or None.
  """
  hessian_KxK: np.ndarray | None
  mean_abs_K: np.ndarray
  max_abs_K: np.ndarray
  sq_norm_K: np.ndarray
  num_tokens: int
  inputs_NxK: np.ndarray | None = None


CompressFn = Callable[[int, dict], None]


def linear_paths(module: nnx.Module, prefix: str = "") -> dict[str, Linear]:
  """Every ``Linear`` under ``module`` by dotted module path (``"self_attn.q_proj"``)."""
  out = {}
  for path, node in nnx.iter_graph(module):
    if isinstance(node, Linear):
      out[prefix + ".".join(str(p) for p in path)] = node
  return out


# ----------------------------------------------------------------------------------- capture

_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _recording(targets: dict[int, str], records: dict):
  """Wrap ``Linear.__call__`` so that the inputs of the target instances are recorded."""
  original = Linear.__call__

  def call(self, x, *args, **kwargs):
    name = targets.get(id(self))
    if name is not None:
      records[name] = x
    return original(self, x, *args, **kwargs)

  with _PATCH_LOCK:
    Linear.__call__ = call
    try:
      yield
    finally:
      Linear.__call__ = original


def _input_stats(x_BxTxK, weight_BxT, hessian: bool, keep: bool):
  x = x_BxTxK.reshape(-1, x_BxTxK.shape[-1]).astype(jnp.float32)
  w = weight_BxT.reshape(-1).astype(jnp.float32)
  a = jnp.abs(x)
  out = {
      "sum_abs": w @ a,
      "max_abs": jnp.max(a * w[:, None], axis=0),
      "sq": w @ (x * x),
  }
  if hessian:
    out["xtx"] = jnp.dot((x * w[:, None]).T, x, precision=jax.lax.Precision.HIGHEST)
  if keep:
    out["x"] = x
  return out


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _capture_block(graphdef, state, x_BxTxD, positions_BxT, mask_BxTxT, inv_freq, weight_BxT,
                   hessian: bool, keep: bool):
  block = nnx.merge(graphdef, state)
  targets = {id(m): name for name, m in linear_paths(block).items()}
  records = {}
  with _recording(targets, records):
    y, _ = block(x_BxTxD, positions_BxT, mask_BxTxT, inv_freq)
  by_input = {}  # layers reading the same array (q/k/v, gate/up) share one reduction
  stats = {}
  for name, x in records.items():
    if id(x) not in by_input:
      by_input[id(x)] = _input_stats(x, weight_BxT, hessian, keep)
    stats[name] = by_input[id(x)]
  return y, stats


@functools.partial(jax.jit, static_argnums=0)
def _forward_block(graphdef, state, x_BxTxD, positions_BxT, mask_BxTxT, inv_freq):
  y, _ = nnx.merge(graphdef, state)(x_BxTxD, positions_BxT, mask_BxTxT, inv_freq)
  return y


# ----------------------------------------------------------------------------------- driver


def _check_inputs(model, tokens_BxT, segment_ids_BxT, batch_size):
  if not hasattr(model, "layers") or not hasattr(model, "embed_tokens"):
    raise QuantError(f"calibration needs a postrl Transformer (with .layers and .embed_tokens), "
                     f"got {type(model).__name__}")
  if tokens_BxT is None:
    raise QuantError("no calibration data: pass calibration tokens, an int array [B, T]")
  try:
    tokens = np.asarray(tokens_BxT)
  except ValueError:  # ragged rows
    raise QuantError("calibration tokens must be a rectangular int array [B, T] (rows of equal "
                     "length: pad them and mark the padding with segment_ids_BxT = 0)") from None
  if tokens.ndim != 2 or tokens.size == 0:
    raise QuantError(f"calibration tokens must be a non-empty int array [B, T], got shape "
                     f"{tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise QuantError(f"calibration tokens must be integer token ids, got dtype {tokens.dtype}")
  vocab = model.embed_tokens.shape[0]
  if tokens.min() < 0 or tokens.max() >= vocab:
    raise QuantError(f"calibration token ids must lie in [0, {vocab}), got range "
                     f"[{tokens.min()}, {tokens.max()}]")
  if segment_ids_BxT is not None:
    if np.shape(segment_ids_BxT) != tokens.shape:
      raise QuantError(f"segment_ids_BxT shape {np.shape(segment_ids_BxT)} != tokens shape "
                       f"{tokens.shape}")
    seg = np.asarray(segment_ids_BxT)
    if not (np.issubdtype(seg.dtype, np.integer) or seg.dtype == bool) or seg.min() < 0:
      raise QuantError(f"segment_ids_BxT must be integers >= 0 (0 = padding), got dtype "
                       f"{seg.dtype}, min {seg.min()}")
  if (not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool)
      or batch_size < 1):
    raise QuantError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
  if max_positions is not None and tokens.shape[1] > max_positions:
    longest = tokens.shape[1]
    if segment_ids_BxT is not None:  # positions restart in every packed segment
      positions = np.asarray(positions_from_segments(jnp.asarray(seg, jnp.int32)))
      longest = int(positions[seg > 0].max(initial=-1)) + 1
    if longest > max_positions:
      raise QuantError(f"calibration sequences of {longest} tokens are longer than the model's "
                       f"max_position_embeddings={max_positions}: the statistics would come "
                       f"from positions it was never trained on (cut the sequences)")
  return tokens


def _chunks(model, tokens, segment_ids_BxT, batch_size):
  """Embedded chunks of ``batch_size`` sequences (the last padded with weight-0 rows)."""
  B, T = tokens.shape
  seg = np.ones((B, T), np.int32) if segment_ids_BxT is None else np.asarray(segment_ids_BxT,
                                                                              np.int32)
  pad = (-B) % batch_size if B > batch_size else 0
  bs = min(batch_size, B)
  tokens = np.concatenate([tokens, np.zeros((pad, T), tokens.dtype)])
  seg = np.concatenate([seg, np.zeros((pad, T), np.int32)])
  dt = dtype_from_name(model.config.dtype)
  embed = model.embed_tokens[...]
  causal = np.tril(np.ones((T, T), bool))[None]
  chunks = []
  for s in range(0, tokens.shape[0], bs):
    tok, sg = jnp.asarray(tokens[s:s + bs]), jnp.asarray(seg[s:s + bs])
    chunks.append(dict(
        x=jnp.take(embed, tok, axis=0).astype(dt),
        positions=positions_from_segments(sg),
        mask=jnp.asarray(causal) & (sg[:, :, None] == sg[:, None, :]),
        weight=(sg > 0).astype(jnp.float32)))
  return chunks


def _finalize(acc: dict, kept: dict, prefix: str, keep_inputs: int, rng) -> dict[str, LayerStats]:
  out = {}
  for name, a in acc.items():
    n = float(a["n"])
    if n == 0:
      raise QuantError("calibration tokens contain no real token (all segment ids are 0)")
    inputs = None
    if keep_inputs:
      rows = np.concatenate(kept[name])
      if rows.shape[0] > keep_inputs:
        rows = rows[np.sort(rng.choice(rows.shape[0], keep_inputs, replace=False))]
      inputs = rows.astype(np.float32)
    out[prefix + name] = LayerStats(
        hessian_KxK=(2.0 * a["xtx"] / n).astype(np.float32) if "xtx" in a else None,
        mean_abs_K=(a["sum_abs"] / n).astype(np.float32),
        max_abs_K=a["max_abs"].astype(np.float32),
        sq_norm_K=a["sq"].astype(np.float32),
        num_tokens=int(n),
        inputs_NxK=inputs)
  return out


def calibrate_sequential(model, tokens_BxT, compress_block: CompressFn | None = None, *,
                         segment_ids_BxT=None, batch_size: int = 8, with_hessian: bool = True,
                         keep_inputs: int = 0, seed: int = 0) -> None:
  """Block-by-block calibration: block i is calibrated on the outputs of compressed blocks < i.

  For i = 0 .. L-1: run block i on its inputs X_i (chunks of ``batch_size`` sequences), reduce
  the statistics of each of its Linears (``LayerStats``), call ``compress_block(i, stats)``
  (which may change block i in place: quantize / prune / rescale its weights), then
  X_{i+1} = block_i'(X_i) with the block as the callback left it. This is the sequential
  scheme of GPTQ (Frantar et al. 2023, Sec. 5 "we quantize ... block by block, using the outputs
  of the already quantized blocks as inputs"), SparseGPT and Wanda.

  Args:
    model: a ``postrl.models.Transformer`` (changed in place only by ``compress_block``).
    tokens_BxT: int calibration tokens.
    compress_block: ``f(block_index, {"layers.i.<path>": LayerStats})`` or None.
    segment_ids_BxT: packing / padding ids (0 = padding, excluded from the statistics).
    batch_size: sequences per compiled chunk (bounds the activation memory).
    with_hessian: compute H (K^2 work per token; Wanda and SmoothQuant do not need it).
    keep_inputs: keep up to this many input rows per layer (a seeded random subset of the real
      tokens) in ``LayerStats.inputs_NxK``; 0 keeps none.
    seed: seed of that subset.
  """
  _run_blocks(model, tokens_BxT, compress_block, True, segment_ids_BxT=segment_ids_BxT,
              batch_size=batch_size, with_hessian=with_hessian, keep_inputs=keep_inputs, seed=seed)


def _run_blocks(model, tokens_BxT, callback, recompute: bool, *, segment_ids_BxT, batch_size,
                with_hessian, keep_inputs, seed):
  tokens = _check_inputs(model, tokens_BxT, segment_ids_BxT, batch_size)
  if not isinstance(keep_inputs, numbers.Integral) or isinstance(keep_inputs, bool) or (
      keep_inputs < 0):
    raise QuantError(f"keep_inputs must be an integer >= 0, got {keep_inputs!r}")
  chunks = _chunks(model, tokens, segment_ids_BxT, batch_size)
  inv_freq = rope_inv_freq(model.config)
  rng = np.random.default_rng(seed)
  keep = keep_inputs > 0
  for i, block in enumerate(model.layers):
    graphdef, state = nnx.split(block)
    acc, kept, outs = {}, {}, []
    for c in chunks:
      y, stats = _capture_block(graphdef, state, c["x"], c["positions"], c["mask"], inv_freq,
                                c["weight"], with_hessian, keep)
      outs.append(y)
      real = np.asarray(c["weight"]).reshape(-1) > 0
      for name, s in stats.items():
        a = acc.setdefault(name, {"sum_abs": 0.0, "max_abs": 0.0, "sq": 0.0, "n": 0})
        if with_hessian:
          a["xtx"] = a.get("xtx", 0.0) + np.asarray(s["xtx"], np.float64)
        a["sum_abs"] = a["sum_abs"] + np.asarray(s["sum_abs"], np.float64)
        a["sq"] = a["sq"] + np.asarray(s["sq"], np.float64)
        a["max_abs"] = np.maximum(a["max_abs"], np.asarray(s["max_abs"], np.float64))
        a["n"] += int(real.sum())
        if keep:
          kept.setdefault(name, []).append(np.asarray(s["x"])[real])
    layer_stats = _finalize(acc, kept, f"layers.{i}.", keep_inputs, rng)
    del acc, kept
    if callback is not None:
      callback(i, layer_stats)
    del layer_stats
    if callback is not None and recompute:
      graphdef, state = nnx.split(block)
      outs = [_forward_block(graphdef, state, c["x"], c["positions"], c["mask"], inv_freq)
              for c in chunks]
    for c, y in zip(chunks, outs):
      c["x"] = y


def calibrate(model, tokens_BxT, *, segment_ids_BxT=None, batch_size: int = 8,
              with_hessian: bool = True, keep_inputs: int = 0,
              seed: int = 0) -> dict[str, LayerStats]:
  """Input statistics of every Linear of the (unchanged) model: ``{"layers.i.<path>": stats}``.

  One forward pass, block by block (``calibrate_sequential`` without compression); see the module
  docstring for the statistics and their memory.
  """
  out = {}
  _run_blocks(model, tokens_BxT, lambda i, stats: out.update(stats), False,
              segment_ids_BxT=segment_ids_BxT, batch_size=batch_size, with_hessian=with_hessian,
              keep_inputs=keep_inputs, seed=seed)
  return out


def target_layers(model, targets: str, who: str, *,
                  include_quantized: bool = False) -> dict[str, Linear]:
  """The float Linears (all Linears with ``include_quantized``) of ``model.layers`` whose name
  matches the regex ``targets`` (``re.search``); a clear error (naming ``who`` and the regex)
  when there are none."""
  try:
    pattern = re.compile(targets)
  except (re.error, TypeError) as e:
    raise QuantError(f"{who}: targets {targets!r} is not a valid regex ({e})") from None
  layers = {}
  for i in range(len(getattr(model, "layers", ()))):
    layers.update(block_linears(model, i))
  chosen = {n: lin for n, lin in layers.items()
            if pattern.search(n) and (include_quantized or not getattr(lin, "quantized", False))}
  if not chosen:
    kind = "Linear" if include_quantized else "float Linear"
    raise QuantError(f"{who}: targets regex {targets!r} matches no {kind} in the model's "
                     f"blocks (e.g. {next(iter(layers), '(none)')})")
  return chosen


def block_linears(model, block_index: int) -> dict[str, Linear]:
  """The Linears of ``model.layers[block_index]`` by full name (``"layers.i.self_attn.q_proj"``)."""
  return linear_paths(model.layers[block_index], prefix=f"layers.{block_index}.")
