"""Pure-jnp reference of the beam step and of the per-row log-softmax top-k.

    cand[b, w, v] = S[b, w] + log_softmax(logits[b, w])[v]
    values, flat = top_k(cand[b].reshape(W V), K)         (lax.top_k: ties to the smaller index)
    beam = flat // V,  token = flat % V,  lse[b, w] = log sum_v exp logits[b, w, v]

The step of token-level beam search (Graves 2012; Wu et al. 2016): S the beam's summed
log-probability, K = 2W candidates so that W survive after EOS candidates are set aside. A row
whose logits are all -inf (every token masked) has lse -inf and every candidate -inf (it would be
NaN through ``log_softmax``); otherwise this is exactly what ``postrl.sampling.search.beam`` ran
before the kernel existed, so its ``impl="xla"`` results are unchanged. This is what the kernel is
tested against, and the XLA path of ``kernels.beam_step`` (``impl="xla"``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class BeamStep(NamedTuple):
  """The K best (beam, token) continuations of each batch row, best first."""
  values_BxK: jax.Array  # float32 S_w + log p(v | beam w)
  beam_BxK: jax.Array    # int32 w
  token_BxK: jax.Array   # int32 v
  lse_BxW: jax.Array     # float32 log sum_v exp logits[b, w, v]


def _log_softmax(logits_xV):
  """float32 log_softmax over the last axis, -inf (not NaN) on rows that are all -inf."""
  x = logits_xV.astype(jnp.float32)
  logp = jax.nn.log_softmax(x, axis=-1)
  empty = jnp.max(x, axis=-1, keepdims=True) == -jnp.inf
  return jnp.where(empty, -jnp.inf, logp), jax.nn.logsumexp(x, axis=-1)


def beam_step_reference(logits_BxWxV, scores_BxW, k: int) -> BeamStep:
  """The K best of S_w + log_softmax(logits_w)[v] over all W x V pairs (module doc).

  Args:
    logits_BxWxV: next-token logits of every beam (any float dtype; computed in float32).
    scores_BxW: the beams' summed log-probs S (-inf: a dead beam).
    k: candidates kept, 1 <= k <= W V.
  Returns:
    ``BeamStep`` (values, beam, token [B, k] in descending order of value, ties to the smaller
    flat index w V + v; lse [B, W]).
  """
  B, W, V = logits_BxWxV.shape
  logp, lse = _log_softmax(logits_BxWxV)
  cand = (scores_BxW.astype(jnp.float32)[:, :, None] + logp).reshape(B, W * V)
  values, flat = lax.top_k(cand, k)
  return BeamStep(values, (flat // V).astype(jnp.int32), (flat % V).astype(jnp.int32), lse)


def log_softmax_topk_reference(logits_xV, k: int):
  """The k largest log-probabilities of each row: (values [..., k] float32, index [..., k] int32,
  lse [...]), values descending, ties to the smaller index (``lax.top_k``)."""
  logp, lse = _log_softmax(logits_xV)
  values, index = lax.top_k(logp, k)
  return values, index.astype(jnp.int32), lse
