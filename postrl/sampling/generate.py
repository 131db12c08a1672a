"""Jit-compiled generation: one prefill over the padded prompts, then a ``lax.while_loop`` decode
with a KV cache, static shapes, no host round-trip per token.

Prompts of different lengths are right-padded to P; row b's prompt fills cache slots
[0, len_b) and its i-th new token is written at slot len_b + i (slot == RoPE position), so every
row sees a contiguous history and padding never enters attention. The loop stops when all rows
have emitted an EOS token or ``max_new_tokens`` are reached.

Sampling transforms the next-token logits in this order (as transformers and vLLM do):

    z = logits / temperature
    top-k: keep the k largest z;  top-p (Holtzman et al. 2020): keep the smallest set of tokens,
    by descending probability, whose mass reaches p;  min-p (Nguyen et al. 2024): keep tokens with
    p_i >= min_p * max_j p_j
    token ~ softmax(z over kept tokens);  temperature == 0 is greedy (argmax).

Each sampled token comes with two log-probs:

* ``logps``: under the sampling distribution (after temperature and truncation; 0 for greedy),
  the behaviour policy's log-prob that importance ratios need;
* ``model_logps``: under the plain model, log softmax(logits)[token], which equals
  ``postrl.logprobs.token_logps`` recomputed by the training path on the same tokens (tested).

``sampling_impl`` picks how a token is drawn: "xla" (``sample_token``: the thresholds by a search
over the float bits, 32 one-bit passes or on a GPU below batch 64 eight 4-bit passes
(``default_bits_per_pass``), then ``jax.random.categorical``), "pallas" (the sort-free Triton
kernel ``kernels.sampling.sample``: exact rejection sampling, the same distribution), or "auto",
the default (``kernels.sampling.choose_impl``: the kernel on one GPU at every batch for top-k,
top-p or min-p, not top-k with top-p, where it was measured the fastest sampler; XLA elsewhere:
CPUs, meshes, greedy, plain temperature sampling, so CPU runs are those of "xla"). The kernel
never computes the truncated distribution's normaliser, so with it ``logps`` is NaN wherever top-k
or top-p truncate (the plain model's ``model_logps``, what trainers use, is always computed).

One prompt on one GPU decodes as two rows, the second a copy of the first, dropped from the
outputs (``min_decode_rows``), unless every block matmul is quantized: XLA compiles a one-row
matmul of a small model into a multiply that writes a weight-sized product and a reduction that
reads it back, a two-row one into a GEMM.
The tokens are then those of row 0 of the prompt given twice (the draws of a [2, V] sample), a
different stream from a one-row call on a CPU with the same key.
"""

from __future__ import annotations

import functools
import numbers
import operator
import warnings
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postrl import sharding as shd
from postrl.models.transformer import KVCache


class GenerateOutput(NamedTuple):
  """Outputs of ``generate``; entries at or beyond ``lengths_B[b]`` are padding (tokens = pad_id)."""
  tokens_BxN: jax.Array
  lengths_B: jax.Array  # number of new tokens, including the EOS token when one was produced
  logps_BxN: jax.Array  # log-prob under the sampling distribution
  model_logps_BxN: jax.Array  # log-prob under the plain model (temperature 1, no truncation)
  finished_B: jax.Array  # True where an EOS token was produced


def _real(x):
  """``x`` as a float when it is a real number (not a bool, a string or a tracer), else None."""
  if isinstance(x, (bool, np.bool_, str, bytes)):
    return None
  try:
    return float(x)
  except Exception:  # pylint: disable=broad-except  # TypeError, ValueError, a tracer's errors
    return None


def _integer(x):
  """``x`` as an int when it is an integer (not a bool, a float or a tracer), else None."""
  if isinstance(x, (bool, np.bool_)):
    return None
  try:
    return operator.index(x)
  except Exception:  # pylint: disable=broad-except
    return None


def check_sampling(fn: str, *, temperature, top_k=None, top_p=None, min_p=None,
                   greedy: bool = True):
  """ValueError naming the setting unless the sampling settings are valid: temperature a finite
  number >= 0 (> 0 unless ``greedy``), top_k an integer >= 1 (k >= V: no truncation), top_p in
  (0, 1], min_p in [0, 1); None turns a filter off. ``fn`` prefixes the message."""
  t = _real(temperature)
  if t is None or not np.isfinite(t) or t < 0 or (t == 0 and not greedy):
    need = "a finite number >= 0" if greedy else "a finite number > 0"
    raise ValueError(f"{fn}: temperature must be {need}, got {temperature!r}")
  if top_k is not None and (_integer(top_k) is None or _integer(top_k) < 1):
    raise ValueError(f"{fn}: top_k must be an integer >= 1 or None (k >= V: no truncation), got "
                     f"{top_k!r}")
  if top_p is not None and not (_real(top_p) is not None and 0.0 < _real(top_p) <= 1.0):
    raise ValueError(f"{fn}: top_p must be in (0, 1] or None, got {top_p!r}")
  if min_p is not None and not (_real(min_p) is not None and 0.0 <= _real(min_p) < 1.0):
    raise ValueError(f"{fn}: min_p must be in [0, 1) or None, got {min_p!r}")


def check_key(fn: str, key):
  """ValueError unless ``key`` is one PRNG key: a scalar typed key (``jax.random.key``) or a
  legacy raw uint32 key (``jax.random.PRNGKey``), not a seed or a batch of keys."""
  dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
    return
  if dtype == np.uint32 and len(shape) == 1:
    try:  # a raw key has the default PRNG implementation's shape ((2,) for threefry)
      jax.random.wrap_key_data(key)
      return
    except (TypeError, ValueError):
      pass
  got = (f"{type(key).__name__} {key!r}" if dtype is None else
         f"an array of shape {tuple(shape)} and dtype {dtype}")
  raise ValueError(f"{fn}: key must be one jax.random key (jax.random.key(seed); split or fold_in "
                   f"it for several draws), got {got}")


def _logits_2d(fn: str, logits):
  """[..., V] logits as [R, V] (and the leading shape to restore)."""
  if getattr(logits, "ndim", 0) < 1 or logits.shape[-1] < 1:
    raise ValueError(f"{fn}: logits need a non-empty vocabulary axis [..., V], got shape "
                     f"{getattr(logits, 'shape', None)}")
  return logits.reshape(-1, logits.shape[-1]), logits.shape[:-1]


def _orderable_uint32(x_f32):
  """Maps float32 to uint32 with the same order (sign bit flipped for x >= 0, all bits for x < 0)."""
  bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
  return jnp.where(bits >> 31 == 0, bits | jnp.uint32(1 << 31), ~bits)


def _smallest_key_below(keys_BxV, count_above_fn, limit, *, bits_per_pass: int = 1):
  """Smallest uint32 b per row with count_above_fn(keys > b) < limit: a radix search over the 32
  key bits, ``bits_per_pass`` bits per pass over V (1: bisection, 32 passes; 4: 8 passes that
  each test 15 thresholds at once).

  Tokens with key >= b are then exactly those with less than ``limit`` (count or mass) strictly
  above them, the rule top-k and top-p use; passes over V replace a full sort, which XLA runs
  slowly on CPU. ``count_above_fn`` maps a [B, C, V] mask to [B, C] and is non-increasing in b,
  so in a pass over the interval [base, base + 2^s) the answer lies in the sub-interval after
  the last of the C = 2^r - 1 inner thresholds c_j = base + j 2^(s - r) - 1 whose count is still
  >= limit. Every setting returns the same b (the smallest one), only the number of passes and
  the work per pass differ.
  """
  if 32 % bits_per_pass:
    raise ValueError(f"bits_per_pass must divide 32, got {bits_per_pass}")
  B = keys_BxV.shape[0]
  C = (1 << bits_per_pass) - 1
  j_C = jnp.arange(1, C + 1, dtype=jnp.uint32)

  def one_pass(t, base):
    shift = (32 - bits_per_pass * (t + 1)).astype(jnp.uint32)  # sub-interval size 2^shift
    thresholds_BxC = base[:, None] + (j_C[None, :] << shift) - 1
    count_BxC = count_above_fn(keys_BxV[:, None, :] > thresholds_BxC[:, :, None])
    still_above = jnp.sum(count_BxC >= limit, axis=1).astype(jnp.uint32)
    return base + (still_above << shift)

  return jax.lax.fori_loop(0, 32 // bits_per_pass, one_pass, jnp.zeros((B,), jnp.uint32))


def process_logits(logits_BxV, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None,
                   bits_per_pass: int = 1):
  """Applies temperature, top-k, top-p and min-p; removed tokens get -inf. Returns float32.

  top-k keeps tokens with fewer than k tokens strictly above them, top-p those whose strictly
  more probable tokens hold less than p of the mass (ties at the boundary are all kept).
  ``bits_per_pass``: how the thresholds are searched (``_smallest_key_below``; same result).
  Settings: temperature > 0, top_k >= 1 (k >= V: none), top_p in (0, 1], min_p in [0, 1), None
  = off (``check_sampling``); logits [B, V] or any [..., V] (each row on its own).
  """
  check_sampling("process_logits", temperature=temperature, top_k=top_k, top_p=top_p,
                 min_p=min_p, greedy=False)
  logits_BxV, lead = _logits_2d("process_logits", jnp.asarray(logits_BxV))
  if len(lead) != 1:
    z = process_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, bits_per_pass=bits_per_pass)
    return z.reshape(*lead, z.shape[-1])
  z = logits_BxV.astype(jnp.float32)
  if temperature != 1.0:
    z = z / temperature
  if top_k is not None and 0 < top_k < z.shape[-1]:
    keys = _orderable_uint32(z)
    threshold = _smallest_key_below(keys, lambda above: jnp.sum(above, axis=-1), top_k,
                                    bits_per_pass=bits_per_pass)
    z = jnp.where(keys >= threshold[:, None], z, -jnp.inf)
  if top_p is not None and top_p < 1.0:
    probs = jax.nn.softmax(z, axis=-1)
    keys = _orderable_uint32(probs)
    threshold = _smallest_key_below(
        keys, lambda above: jnp.sum(jnp.where(above, probs[:, None, :], 0.0), axis=-1), top_p,
        bits_per_pass=bits_per_pass)
    z = jnp.where(keys >= threshold[:, None], z, -jnp.inf)
  if min_p is not None and min_p > 0.0:
    logp = jax.nn.log_softmax(z, axis=-1)
    z = jnp.where(logp < jnp.log(min_p) + jnp.max(logp, axis=-1, keepdims=True), -jnp.inf, z)
  return z


def default_bits_per_pass(batch: int, platform: str | None = None) -> int:
  """Threshold bits searched per pass over V by ``generate``'s XLA sampler (``process_logits``;
  same thresholds either way): 4 (8 passes of 15 thresholds) on a GPU below batch 64, else 1 (the
  32-pass bisection). Measured on one H100, V = 152k, top-p (``benchmarks/sampling.py``,
  2026-11-26): 112 vs 830 us at B = 1 and 456 vs 1262 us at B = 16 for the 4-bit search, 1390 vs
  1483 us at B = 64 and 4536 vs 5395 us at B = 256 for the bisection; on a 2-core CPU the
  bisection wins (27.7 vs 55.0 ms at B = 16, V = 49k)."""
  platform = platform or jax.default_backend()
  return 4 if platform in ("gpu", "cuda", "rocm") and batch < 64 else 1


def sample_token(key, logits_BxV, *, temperature, top_k, top_p, min_p, bits_per_pass: int = 1):
  """Samples one token per row -> (token_B, sampling logp_B, plain-model logp_B)
  (``bits_per_pass``: the threshold search of ``process_logits``; temperature 0 = argmax, the key
  unused; logits [B, V] or any [..., V], the outputs then [...])."""
  check_sampling("sample_token", temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  logits_BxV, lead = _logits_2d("sample_token", jnp.asarray(logits_BxV))
  if temperature != 0.0:
    check_key("sample_token", key)
  if len(lead) != 1:
    out = sample_token(key, logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, bits_per_pass=bits_per_pass)
    return tuple(x.reshape(lead) for x in out)
  model_logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  if temperature == 0.0:
    token = jnp.argmax(logits_BxV, axis=-1)
    logp = jnp.zeros(token.shape, jnp.float32)
  else:
    z = process_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       bits_per_pass=bits_per_pass)
    token = jax.random.categorical(key, z, axis=-1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), token[:, None], axis=-1)[:, 0]
  model_logp = jnp.take_along_axis(model_logp_BxV, token[:, None], axis=-1)[:, 0]
  return token.astype(jnp.int32), logp, model_logp


def kernel_sample_token(key, logits_BxV, *, temperature, top_k, top_p, min_p, impl, interpret):
  """``sample_token`` through the Pallas kernel (``kernels.sampling.sample``): the same
  distribution; the sampling log-prob is exact without truncation or with min-p alone
  (log_softmax of the kept z) and NaN under top-k / top-p (the kernel has no normaliser)."""
  from kernels import sampling as sampling_kernels  # pylint: disable=import-outside-toplevel
  token, model_logp = sampling_kernels.sample(key, logits_BxV, temperature=temperature,
                                              top_k=top_k, top_p=top_p, min_p=min_p, impl=impl,
                                              interpret=interpret)
  V = logits_BxV.shape[-1]
  if (top_k is not None and 0 < top_k < V) or (top_p is not None and top_p < 1.0):
    logp = jnp.full(token.shape, jnp.nan, jnp.float32)
  else:  # no truncation or min-p only: the kept set is a threshold of z, its normaliser known
    z = process_logits(logits_BxV, temperature=temperature, min_p=min_p)
    logp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, logp, model_logp


# XLA's GPU compiler strength-reduces a vector x matrix product whose operands hold fewer elements
# than this (``GpuAlgebraicSimplifier::ShouldStrengthReduceDotToReduce``, K + K N < 10M).
STRENGTH_REDUCED_BELOW = 10_000_000


def has_small_float_matmuls(params) -> bool:
  """Whether ``params`` (an ``nnx.State``) holds a float ``nnx.Param`` matrix [K, N] with
  K + K N < ``STRENGTH_REDUCED_BELOW``: a matmul that one row of activations would turn into a
  multiply + reduction on a GPU (``min_decode_rows``). Quantized storage (``postrl.quant``) is not
  an ``nnx.Param``: its matmuls are the Pallas kernels, which take one row as it is."""
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for leaf in leaves:
    if not isinstance(leaf, nnx.Param):
      continue
    shape, dtype = getattr(leaf, "shape", ()), getattr(leaf, "dtype", None)
    if len(shape) == 2 and dtype is not None and jnp.issubdtype(dtype, jnp.floating) and (
        shape[0] + shape[0] * shape[1] < STRENGTH_REDUCED_BELOW):
      return True
  return False


def min_decode_rows(batch: int, platform: str, num_devices: int,
                    small_float_matmuls: bool = True) -> int:
  """How many rows ``generate`` decodes for ``batch`` prompts: 2 for one prompt on one GPU when
  the model has float matmuls XLA would strength-reduce (``has_small_float_matmuls``), else
  ``batch``. The second row repeats the first and is dropped from the outputs.

  Why: XLA's GPU compiler rewrites a vector x matrix product (one row of activations) whose
  operands hold fewer than 10M elements as an elementwise multiply and a reduction
  (``GpuAlgebraicSimplifier::ShouldStrengthReduceDotToReduce``), and fuses the producer of the
  vector (RMSNorm) into the multiply. So at batch 1 every projection of a small model writes a
  weight-sized [K, N] product to memory and reads it back: three times the weight bytes and two
  launches per matmul. With two rows the product is a matrix product: one Triton GEMM that reads
  the weights once, and XLA merges the q / k / v and gate / up GEMMs that share their input.
  Compiled for an H100 (``benchmarks/xla_gpu_offline.py``), one SmolLM2-135M decode step launches
  749 operations at batch 1 and 483 at batch 2. Several devices are left alone (each holds B /
  shards rows of its own), and so is a model whose block matmuls are all quantized: its Pallas
  kernels take one row as it is (the int4 GEMV kernel runs only at one row)."""
  if (batch == 1 and num_devices == 1 and platform in ("gpu", "cuda", "rocm")
      and small_float_matmuls):
    return 2
  return batch


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "eos_ids", "pad_id",
    "sampling_impl", "interpret", "rows", "cache_sharding", "bits_per_pass", "min_rows"))
def _generate(graphdef, params, prompt_BxP, lengths_B, key, *, max_new_tokens, temperature, top_k,
              top_p, min_p, eos_ids, pad_id, sampling_impl="xla", interpret=False, rows=None,
              cache_sharding=None, bits_per_pass=1, min_rows=1):
  B = prompt_BxP.shape[0]
  if B < min_rows:  # decode min_rows rows, the extra ones repeating row 0 (``min_decode_rows``)
    extra = min_rows - B
    prompt_BxP = jnp.concatenate([prompt_BxP, jnp.repeat(prompt_BxP[:1], extra, axis=0)])
    lengths_B = jnp.concatenate([lengths_B, jnp.repeat(lengths_B[:1], extra, axis=0)])
    out = _generate(graphdef, params, prompt_BxP, lengths_B, key, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    eos_ids=eos_ids, pad_id=pad_id, sampling_impl=sampling_impl,
                    interpret=interpret, rows=rows, cache_sharding=cache_sharding,
                    bits_per_pass=bits_per_pass)
    return GenerateOutput(*(x[:B] for x in out))
  model = nnx.merge(graphdef, params)
  B, P = prompt_BxP.shape
  N = max_new_tokens
  # rows: a NamedSharding of dimension 0 (``row_sharding``): every per-row array of the loop
  # (cache, logits, outputs) stays split over the mesh's batch axes, so each device decodes its
  # own rows (the weights follow their own shardings); None = every device decodes every row.
  # The cache also splits its key/value heads as the k / v projections do (``cache_sharding``).
  split = (lambda tree: jax.lax.with_sharding_constraint(tree, rows)) if rows else (lambda t: t)
  split_cache = ((lambda c: jax.lax.with_sharding_constraint(c, cache_sharding))
                 if cache_sharding else split)
  cache = split_cache(KVCache.zeros(model.config, B, P + N))
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  # prefill: project only each row's last real position to the vocabulary (not [B, P, V])
  h_BxPxD, cache = model.hidden_states(prompt_BxP, positions_BxT=positions, cache=cache)
  h_last = jnp.take_along_axis(h_BxPxD, (lengths_B - 1)[:, None, None], axis=1)
  last_logits = model.logits(h_last)[:, 0]
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, bits_per_pass=bits_per_pass)
  if sampling_impl != "xla":
    sample = functools.partial(kernel_sample_token, temperature=temperature, top_k=top_k,
                               top_p=top_p, min_p=min_p, impl=sampling_impl, interpret=interpret)

  def cond(state):
    step, _, _, _, done, _ = state
    return (step < N) & ~jnp.all(done)

  def body(state):
    step, cache, logits, out, done, gen_len = state
    token, logp, model_logp = sample(jax.random.fold_in(key, step), logits)
    token = jnp.where(done, pad_id, token)
    live = ~done
    out = (out[0].at[:, step].set(token),
           out[1].at[:, step].set(jnp.where(live, logp, 0.0)),
           out[2].at[:, step].set(jnp.where(live, model_logp, 0.0)))
    gen_len = gen_len + live.astype(jnp.int32)
    done = done | jnp.isin(token, eos)
    logits, cache = model.decode(token[:, None], (lengths_B + step)[:, None], cache)
    return step + 1, split_cache(cache), *split((logits[:, 0], out, done, gen_len))

  out = (jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32),
         jnp.zeros((B, N), jnp.float32))
  state = (jnp.int32(0), split_cache(cache), *split((last_logits, out, jnp.zeros((B,), bool),
                                                     jnp.zeros((B,), jnp.int32))))
  if eos_ids:  # rows can stop early: leave the loop once every row has
    _, _, _, out, done, gen_len = jax.lax.while_loop(cond, body, state)
  else:  # a fixed trip count: no per-step readback of a data-dependent loop condition
    _, _, _, out, done, gen_len = jax.lax.fori_loop(0, N, lambda _, st: body(st), state)
  return GenerateOutput(out[0], gen_len, out[1], out[2], done)


def cache_sharding_for(rows, config, batch: int, length: int):
  """The KV cache's [B, S, Hkv, Dh] sharding next to ``rows``: rows over the batch axes, heads
  over the axes the ``kv_heads`` rule gives when Hkv divides (``postrl.sharding.logical_to_spec``)
  so that writing a step's k / v moves nothing between devices."""
  shape = (batch, length, config.num_key_value_heads, config.dim_per_head)
  spec = shd.logical_to_spec(("batch", None, "kv_heads", None), shape, rows.mesh)
  return jax.sharding.NamedSharding(rows.mesh, spec)


def row_sharding(params, batch: int):
  """How ``generate`` splits B rows: the NamedSharding of dimension 0 over the batch axes of the
  parameters' mesh (``postrl.sharding.batch_sharding``), or None when the parameters are not on
  a mesh, the mesh has no batch axis of size > 1, or B is not a multiple of its batch shards (then
  every device decodes every row)."""
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      mesh = sharding.mesh
      shards = shd.batch_shards(mesh)
      if shards > 1 and batch % shards == 0:
        return shd.batch_sharding(mesh)
      return None
  return None


def _int_array(name: str, x, what: str) -> np.ndarray:
  """``x`` on the host as int64, refusing what a cast would change: ragged lists, non-numbers and
  fractional values (whole-number floats are taken)."""
  try:
    a = to_host(x) if isinstance(x, jax.Array) else np.asarray(x)
  except ValueError:  # numpy: "inhomogeneous shape" for ragged lists
    raise ValueError(f"{name} must be {what}, got a ragged sequence") from None
  if a.dtype.kind in "iu":
    return a.astype(np.int64)
  if a.dtype.kind != "f" or not np.all(np.isfinite(a) & (a == np.round(a))):
    raise ValueError(f"{name} must hold integers ({what}), got dtype {a.dtype}"
                     + (" with values that are not whole numbers (a cast would truncate them)"
                        if a.dtype.kind == "f" else ""))
  if a.size and np.abs(a).max() >= 2**62:
    raise ValueError(f"{name} must hold integers ({what}), got values out of the int64 range")
  return a.astype(np.int64)


def _check_prompts(prompt_BxP, lengths_B, vocab_size: int, fn: str = "generate"):
  """The prompts and lengths as host int32 arrays, checked: [B, P] and [B] with B >= 1, lengths
  in [1, P], every real token (position < length) in [0, V). The padding is set to token 0: its
  keys and values are written to the cache (then overwritten or masked), so an id outside the
  vocabulary there (NaN from the embedding gather) would reach the rows' attention as 0 * NaN."""
  prompt = _int_array("prompt_BxP", prompt_BxP, "a [B, P] array of right-padded token ids "
                      "(pad ragged lists with pad_prompts)")
  lengths = _int_array("lengths_B", lengths_B, "a [B] array of prompt lengths")
  if prompt.ndim != 2 or lengths.shape != prompt.shape[:1]:
    raise ValueError(f"prompt_BxP must be [B, P] and lengths_B [B]; got {prompt.shape} and "
                     f"{lengths.shape}")
  B, P = prompt.shape
  if B == 0:
    raise ValueError(f"{fn}: prompt_BxP has no rows (B = 0): give at least one prompt")
  if lengths.min() < 1 or lengths.max() > P:
    raise ValueError(f"prompt lengths must be in [1, {P}], got {lengths}")
  real = np.arange(P)[None, :] < lengths[:, None]
  bad = real & ((prompt < 0) | (prompt >= vocab_size))
  if bad.any():
    b, t = (int(i[0]) for i in np.nonzero(bad))
    raise ValueError(f"prompt_BxP: token id {int(prompt[b, t])} (row {b}, position {t}) is outside "
                     f"the model's vocabulary [0, {vocab_size})")
  return np.where(real, prompt, 0).astype(np.int32), lengths.astype(np.int32)


def generate(model, prompt_BxP, lengths_B, *, key=None, max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, eos_ids: Sequence[int] | None = None,
             pad_id: int = 0, sampling_impl: str = "auto", interpret: bool = False,
             split_rows: bool = True, gather_weights: bool = True) -> GenerateOutput:
  """Samples continuations of a batch of right-padded prompts (see the module docstring).

  With parameters on a device mesh (``postrl.sharding``), the B rows are split over the mesh's
  batch axes (``row_sharding``: data-parallel decoding, each device generates B / shards rows;
  the outputs are global arrays split the same way, ``to_host`` gathers them). Random draws do
  not depend on the split (JAX's partitionable threefry), so the tokens are those of a
  one-device run. ``split_rows=False`` keeps every row on every device. Weights sharded over the
  batch axes (fsdp) are first gathered whole onto each device (``gather_weights``;
  ``postrl.sharding.gather_over_batch_axes``, tensor splits kept): one all-gather per call
  instead of one per layer per decode step, for a copy of the weights per fsdp group.

  Args:
    model: a ``postrl.models.Transformer`` (or a ``(graphdef, params)`` pair from ``nnx.split``).
    prompt_BxP: [B, P] integer prompt tokens, right-padded (B >= 1; ``pad_prompts`` pads ragged
      lists); every real token must lie in [0, V), the padding may hold any id (it is replaced).
    lengths_B: prompt lengths, in [1, P].
    key: one PRNG key (required unless temperature == 0).
    max_new_tokens: N >= 1, the number of decode steps at most.
    temperature, top_k, top_p, min_p: sampling settings; temperature 0 = greedy, a finite
      temperature >= 0, top_k >= 1 (k >= V: no truncation), top_p in (0, 1], min_p in [0, 1).
    eos_ids: token ids in [0, V) that end a row, or one id (default: the model config's EOS ids).
    pad_id: written after a row ends (any int32).
    sampling_impl: "auto" (default) | "xla" | "pallas" (module doc). "auto" is XLA on CPUs and
      meshes (the same tokens as "xla") and the sort-free kernel on one GPU at every batch for
      top-k, top-p or min-p (not top-k with top-p). With the kernel ``logps`` is NaN where
      top-k / top-p truncate (its normaliser is never computed); ``model_logps``, what trainers
      use, is always exact. Pass "xla" for the truncated distribution's log-probs.
    interpret: run the Pallas sampling kernel in interpret mode (CPU tests of "pallas").
    split_rows: split the rows over the parameters' mesh (above) when B allows it.
    gather_weights: decode from weights replicated over the batch axes (above); False decodes
      from the training shardings (less memory, an all-gather per layer per step).
  Returns:
    ``GenerateOutput`` with [B, N] tokens and log-probs and [B] lengths.
  """
  call = _prepare_decode("generate", model, prompt_BxP, lengths_B, key=key,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, min_p=min_p, eos_ids=eos_ids, pad_id=pad_id,
                         sampling_impl=sampling_impl, split_rows=split_rows,
                         gather_weights=gather_weights)
  rows, B, P = call.rows, call.prompt.shape[0], call.prompt.shape[1]
  return _generate(call.graphdef, call.params, call.prompt, call.lengths, call.key,
                   **call.settings, interpret=bool(interpret), rows=rows,
                   min_rows=call.rows_decoded,
                   cache_sharding=None if rows is None else cache_sharding_for(
                       rows, call.config, B, P + call.settings["max_new_tokens"]))


class _DecodeCall(NamedTuple):
  """A decode program's checked inputs (``_prepare_decode``)."""
  graphdef: object
  params: object
  config: object
  prompt: object  # [B, P] int32, placed
  lengths: object  # [B] int32, placed
  key: object
  rows: object  # the rows' NamedSharding or None (``row_sharding``)
  rows_decoded: int  # rows per decode step (``min_decode_rows``)
  settings: dict  # the static sampling arguments of the jitted program


def _prepare_decode(fn: str, model, prompt_BxP, lengths_B, *, key, max_new_tokens, temperature,
                    top_k, top_p, min_p, eos_ids, pad_id, sampling_impl, split_rows,
                    gather_weights, rows_per_step: int | None = None) -> _DecodeCall:
  """Checks ``generate``'s arguments (errors prefixed by ``fn``) and places its inputs: the
  weights gathered over the batch axes, the prompts split over the rows or replicated over a
  mesh that spans processes, the sampling implementation chosen for ``rows_per_step`` rows per
  decode step (default: the B prompts)."""
  if isinstance(model, tuple):
    graphdef, params = model
    config = nnx.merge(graphdef, params).config
  else:
    graphdef, params = nnx.split(model)
    config = model.config
  if sampling_impl not in ("xla", "auto", "pallas"):
    raise ValueError(f"sampling_impl must be 'xla', 'auto' or 'pallas', got {sampling_impl!r}")
  check_sampling(fn, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  temperature = float(temperature)
  top_k = None if top_k is None else operator.index(top_k)
  top_p = None if top_p is None else float(top_p)
  min_p = None if min_p is None else float(min_p)
  if _integer(max_new_tokens) is None or max_new_tokens < 1:
    raise ValueError(f"{fn}: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  max_new_tokens = operator.index(max_new_tokens)
  if temperature > 0 and key is None:
    raise ValueError(f"{fn}: sampling with temperature > 0 needs a PRNG key "
                     "(key=jax.random.key(0))")
  if key is None:
    key = jax.random.key(0)
  elif temperature > 0:
    check_key(fn, key)
  prompt_np, lengths_np = _check_prompts(prompt_BxP, lengths_B, config.vocab_size, fn)
  if _integer(pad_id) is None or not -2**31 <= pad_id < 2**31:
    raise ValueError(f"{fn}: pad_id must be an int32 integer, got {pad_id!r}")
  eos = config.eos_token_ids if eos_ids is None else eos_ids
  if _integer(eos) is not None:  # one id
    eos = (eos,)
  elif isinstance(eos, (str, bytes)) or not hasattr(eos, "__iter__"):
    eos = (eos,)  # refused below, named
  eos = tuple(eos)
  if not all(_integer(e) is not None and 0 <= e < config.vocab_size for e in eos):
    what = "the model config's eos_token_id" if eos_ids is None else "eos_ids"
    raise ValueError(f"{fn}: {what} must be token ids in [0, {config.vocab_size}) (the model's "
                     f"vocabulary; an id outside it never ends a row), got {eos}")
  eos = tuple(operator.index(e) for e in eos)
  positions = int(lengths_np.max()) + max_new_tokens
  if positions > config.max_position_embeddings:
    warnings.warn(
        f"{fn}: the longest prompt ({int(lengths_np.max())} tokens) plus max_new_tokens="
        f"{max_new_tokens} needs {positions} positions, more than the model's "
        f"max_position_embeddings={config.max_position_embeddings} it was trained on: tokens "
        "past them are unreliable", stacklevel=3)  # the caller of generate
  prompt_BxP, lengths_B = prompt_np, lengths_np
  mesh = _multi_process_mesh(params)
  rows = row_sharding(params, prompt_BxP.shape[0]) if split_rows else None
  if gather_weights and shd.split_over_batch_axes(params):
    params = shd.gather_over_batch_axes(params)
  if mesh is not None:  # params span several processes: inputs become global arrays
    (key_data,) = replicate_inputs(mesh, np.asarray(jax.random.key_data(key)))
    key = jax.random.wrap_key_data(key_data)
    prompt_BxP, lengths_B = place_inputs(mesh, rows, prompt_np, lengths_np)
  else:
    prompt_BxP, lengths_B = place_inputs(None, rows, prompt_BxP, lengths_B)
  devices = {d for x in jax.tree.leaves(params) if isinstance(x, jax.Array)
             for d in x.sharding.device_set}
  for option, what in (("decode_attention_impl", "the decode-attention kernel"),
                       ("decode_block_impl", "the fused decoder layer")):
    chosen = getattr(config, option)
    if chosen.startswith("pallas") and (mesh is not None or len(devices) > 1):
      raise ValueError(f"{option}={chosen!r}: {what} runs on one device; the parameters span "
                       f"{len(devices)} (use 'xla')")
  platform = next(iter(devices)).platform if devices else jax.default_backend()
  rows_decoded = min_decode_rows(int(prompt_BxP.shape[0]) if rows_per_step is None
                                 else rows_per_step, platform,
                                 len(devices) or 1,  # host arrays: jit runs on one device
                                 has_small_float_matmuls(params))
  impl = "xla"
  if sampling_impl != "xla":  # kernels.sampling imports this module: imported here
    from kernels import sampling as sampling_kernels  # pylint: disable=import-outside-toplevel
    impl = sampling_kernels.choose_impl(config.vocab_size, temperature=float(temperature),
                                        top_k=top_k, top_p=top_p, min_p=min_p,
                                        impl=sampling_impl, batch=rows_decoded)
    if impl != "xla" and (mesh is not None or len(devices) > 1):
      raise ValueError(f"sampling_impl={sampling_impl!r}: the sampling kernel runs on one device; "
                       f"the parameters span {len(devices)} (use 'xla' or 'auto')")
  settings = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=top_k,
                  top_p=top_p, min_p=min_p, eos_ids=eos, pad_id=int(pad_id), sampling_impl=impl,
                  bits_per_pass=default_bits_per_pass(rows_decoded, platform))
  return _DecodeCall(graphdef, params, config, prompt_BxP, lengths_B, key, rows, rows_decoded,
                     settings)


def _multi_process_mesh(params):
  """The mesh of parameters that live on several processes' devices, else None."""
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return leaf.sharding.mesh
  return None


def replicate_inputs(mesh, *arrays_np):
  """Host arrays (identical on every process) as global arrays replicated over ``mesh``: what a
  jitted program over parameters that span several processes takes as its other inputs."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return tuple(jax.make_array_from_callback(x.shape, replicated, lambda idx, x=x: x[idx])
               for x in arrays_np)


def place_inputs(mesh, rows, *arrays):
  """Per-row inputs (identical on every process) placed for a decode program: split by ``rows``
  (each device its rows; ``put_rows`` when the parameters span processes), replicated global
  arrays when ``mesh`` spans processes and the rows are not split, else unchanged."""
  if mesh is not None:
    arrays = tuple(np.asarray(x) for x in arrays)
    return put_rows(rows, *arrays) if rows is not None else replicate_inputs(mesh, *arrays)
  return jax.device_put(arrays, rows) if rows is not None else arrays


def put_rows(rows, *arrays_np):
  """Host arrays (identical on every process) as global arrays split by ``rows`` (each process
  fills only its own devices' rows)."""
  return tuple(jax.make_array_from_callback(x.shape, rows, lambda idx, x=x: x[idx])
               for x in arrays_np)


def to_host(x) -> np.ndarray:
  """A (possibly multi-process, global) array as a numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, multiple: int = 1):
  """Right-pads token lists -> (tokens_BxP int32, lengths_B int32); P rounded up to ``multiple``
  (an integer >= 1) so that prompts of nearby lengths share one compiled program. Token ids must
  be integers (whole-number floats are taken) that fit int32, as must ``pad_id``."""
  if _integer(multiple) is None or multiple < 1:
    raise ValueError(f"pad_prompts: multiple must be an integer >= 1, got {multiple!r}")
  if _integer(pad_id) is None or not -2**31 <= pad_id < 2**31:
    raise ValueError(f"pad_prompts: pad_id must be an int32 integer, got {pad_id!r}")
  if isinstance(prompts, (str, bytes)):
    raise ValueError("pad_prompts: prompts must be a list of token-id lists, got a string "
                     "(encode it with the tokenizer first)")
  if len(prompts) == 0:
    raise ValueError("pad_prompts: no prompts (every prompt needs at least one token)")
  rows = []
  for i, p in enumerate(prompts):
    if isinstance(p, (str, bytes)):
      raise ValueError(f"pad_prompts: prompt #{i} is a string, not a list of token ids (encode "
                       "it with the tokenizer first)")
    row = _int_array(f"pad_prompts: prompt #{i}", p, "a list of token ids")
    if row.ndim != 1:
      raise ValueError(f"pad_prompts: prompt #{i} must be a flat list of token ids, got shape "
                       f"{row.shape}")
    if row.size == 0:
      raise ValueError(f"every prompt needs at least one token: prompt #{i} is empty")
    if row.min() < -2**31 or row.max() >= 2**31:
      raise ValueError(f"pad_prompts: prompt #{i} holds token ids that do not fit int32")
    rows.append(row)
  P = max(len(r) for r in rows)
  P = -(-P // multiple) * multiple
  tokens = np.full((len(rows), P), pad_id, np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return tokens, np.array([len(r) for r in rows], np.int32)


def stop_and_pad_ids(model, tokenizer) -> tuple[tuple[int, ...], int]:
  """EOS ids (the model config's and the tokenizer's, merged) and the pad id (tokenizer's, else 0)."""
  eos = tuple(sorted({e for e in (*model.config.eos_token_ids, tokenizer.eos_id) if e is not None}))
  return eos, tokenizer.pad_id if tokenizer.pad_id is not None else 0


def generate_text(model, tokenizer, prompts: Sequence[str], *, chat: bool = True, key=None,
                  max_new_tokens: int = 64, **sampling) -> list[str]:
  """Strings in, completions out: applies the chat template (when ``chat``), generates, decodes.
  ``prompts`` is a list of strings (one string alone is refused: it is not a batch of its
  characters)."""
  if isinstance(prompts, (str, bytes)):
    raise ValueError("generate_text: prompts must be a list of strings, got one string (pass "
                     "[prompt])")
  prompts = list(prompts)
  if not prompts:
    raise ValueError("generate_text: prompts is empty: give at least one prompt")
  if not all(isinstance(p, str) for p in prompts):
    bad = next(i for i, p in enumerate(prompts) if not isinstance(p, str))
    raise ValueError(f"generate_text: prompts must be strings, prompt #{bad} is "
                     f"{type(prompts[bad]).__name__}")
  if chat:
    ids = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
  else:
    ids = [tokenizer.encode(p) for p in prompts]
  default_eos, pad = stop_and_pad_ids(model, tokenizer)
  tokens, lengths = pad_prompts(ids, pad_id=pad, multiple=16)
  eos = sampling.pop("eos_ids", None)
  if eos is None:
    eos = default_eos
  out = generate(model, tokens, lengths, key=key, max_new_tokens=max_new_tokens, eos_ids=eos,
                 pad_id=pad, **sampling)
  toks, lens = to_host(out.tokens_BxN), to_host(out.lengths_B)
  return [tokenizer.decode(toks[i, :lens[i]]) for i in range(len(prompts))]
