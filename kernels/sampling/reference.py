"""Pure-jnp references of top-k / top-p / min-p sampling, one token per row.

``sample_reference`` is exactly postrl's sampler (``postrl.sampling.generate.process_logits`` then
``jax.random.categorical``): z = logits / temperature; top-k keeps the tokens with fewer than k
tokens strictly above them; top-p (Holtzman et al. 2020), over the top-k set renormalised, keeps the
tokens whose strictly more probable tokens hold less than p of the mass (ties at the boundary are
all kept); min-p (Nguyen et al. 2024) keeps p_i >= min_p * max_j p_j; temperature 0 is greedy.
Thresholds are found by a 32-step bisection over the float32 bit patterns (32 passes over V,
no sort). This is the ``impl="xla"`` path of ``kernels.sampling.sample`` and what the kernel is
tested against.

``sort_sample`` is the classic sort-based sampler (as in transformers' ``TopPLogitsWarper``): sort
the row, cumulative sum of the sorted probabilities, keep the prefix whose exclusive cumulative
mass is below p. It is the baseline the benchmark times ("XLA's sort-based top-p"). It agrees with
``sample_reference`` except that tied tokens at the top-k / top-p boundary are cut by sort order
instead of all kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from postrl.sampling.generate import process_logits, sample_token


def sample_reference(key, logits_BxV, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, min_p: float | None = None):
  """token_B ~ softmax(process_logits(logits)) -> (token_B int32, model_logp_B float32).

  model_logp = log_softmax(logits)[token] at temperature 1 without truncation (the plain model's
  log-prob, which trainers recompute); temperature 0 is argmax.
  """
  token, _, model_logp = sample_token(key, logits_BxV, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p)
  return token, model_logp


def kept_mask(logits_BxV, *, temperature: float = 1.0, top_k: int | None = None,
              top_p: float | None = None, min_p: float | None = None):
  """Boolean [B, V]: the tokens ``sample_reference`` can draw (its kept set)."""
  z = process_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  return z > -jnp.inf


def sort_sample(key, logits_BxV, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, min_p: float | None = None):
  """Sort-based sampling -> (token_B int32, model_logp_B float32).

  One sort of (-z, index) per row; in sorted order q_i = softmax(z)_i, keep position i when
  i < k (top-k), sum_{l<i} q_l < p (top-p, over the renormalised top-k prefix) and
  q_i >= min_p q_0 (min-p); sample a position, map it back through the sort's indices.
  """
  x = logits_BxV.astype(jnp.float32)
  model_logp_BxV = jax.nn.log_softmax(x, axis=-1)
  z = x / temperature if temperature != 1.0 else x
  b, v = z.shape
  iota = jax.lax.broadcasted_iota(jnp.int32, (b, v), 1)
  neg_sorted, order = jax.lax.sort((-z, iota), dimension=1, num_keys=1)
  zs = -neg_sorted
  if top_k is not None and top_k < v:
    zs = jnp.where(iota < top_k, zs, -jnp.inf)
  if top_p is not None and top_p < 1.0:
    q = jax.nn.softmax(zs, axis=-1)
    zs = jnp.where(jnp.cumsum(q, axis=-1) - q < top_p, zs, -jnp.inf)
  if min_p is not None and min_p > 0.0:
    zs = jnp.where(zs - zs[:, :1] >= jnp.log(min_p), zs, -jnp.inf)
  pos = jax.random.categorical(key, zs, axis=-1)
  token = jnp.take_along_axis(order, pos[:, None], axis=-1)[:, 0]
  model_logp = jnp.take_along_axis(model_logp_BxV, token[:, None], axis=-1)[:, 0]
  return token.astype(jnp.int32), model_logp
