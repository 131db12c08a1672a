"""The one place where tokens become per-token log-probabilities.

    logp[b, t] = log softmax(h[b, t-1] W)[tokens[b, t]]   for t >= 1,   logp[b, 0] = 0

The next-token shift happens here and nowhere else: the result is aligned with ``tokens_BxT`` so a
response mask over tokens applies to it directly (``logps_BxT * mask_BxT``). Every trainer, the
sampler's contract test and the evaluation code go through ``token_logps``.

With ``chunk=C`` the output projection and the log-softmax run over C positions at a time, and
with ``vocab_chunk=K`` over K vocabulary columns at a time (an online log-sum-exp), each under
``jax.checkpoint``, so the full [B, T, V] logits never exist, in the forward or the backward pass:
the largest logits block alive is [B, C, K].
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from postrl.models.config import ConfigError

# apply_fn(params, tokens_BxT, segment_ids_BxT) -> (hidden_BxTxD, unembed_DxV)
ApplyFn = Callable[..., tuple[jax.Array, jax.Array]]


def model_apply_fn(graphdef) -> ApplyFn:
  """The ``apply_fn`` of an NNX ``Transformer`` split as ``graphdef, params = nnx.split(model)``."""

  def apply_fn(params, tokens_BxT, segment_ids_BxT=None):
    model = nnx.merge(graphdef, params)
    h = model.hidden_states(tokens_BxT, segment_ids_BxT=segment_ids_BxT)
    w, tied = model.unembed_VxD_or_DxV()
    return h, (w.T if tied else w)

  return apply_fn


def _target_logps(h_BxTxD, w_DxV, targets_BxT):
  """log softmax(h W)[target], with the logits accumulated in float32."""
  logits = jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV.astype(h_BxTxD.dtype),
                      preferred_element_type=jnp.float32)
  picked = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def _vocab_chunks(w_DxV, vocab_chunk: int):
  """[D, V] -> [n, D, C] zero-padded column blocks (done once, outside any sequence loop)."""
  D, V = w_DxV.shape
  n = -(-V // vocab_chunk)
  return jnp.pad(w_DxV, ((0, 0), (0, n * vocab_chunk - V))).reshape(
      D, n, vocab_chunk).swapaxes(0, 1)


def _target_logps_vocab_chunked(h_BxTxD, w_NxDxC, vocab_size: int, targets_BxT):
  """``_target_logps`` with the vocabulary scanned C columns (one block of w_NxDxC) at a time.

  An online log-sum-exp (running max m and sum s, rescaled when m grows) over vocab chunks:
      m' = max(m, max_v z_v),  s' = s exp(m - m') + sum_v exp(z_v - m'),  lse = m + log s
  Each chunk's body is rematerialised, so only [B, T] carries are kept for the backward pass.
  """
  n, _, vocab_chunk = w_NxDxC.shape
  V = vocab_size
  B, T = targets_BxT.shape

  @jax.checkpoint
  def body(carry, xs):
    m, s, picked = carry
    w_DxC, start = xs
    z = jnp.einsum("btd,dc->btc", h_BxTxD, w_DxC.astype(h_BxTxD.dtype),
                   preferred_element_type=jnp.float32)
    col = start + jnp.arange(vocab_chunk)
    z = jnp.where(col < V, z, -jnp.inf)  # padded columns take no probability
    m_new = jnp.maximum(m, z.max(axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[..., None]).sum(axis=-1)
    local = targets_BxT - start
    inside = (local >= 0) & (local < vocab_chunk)
    z_t = jnp.take_along_axis(z, jnp.clip(local, 0, vocab_chunk - 1)[..., None], axis=-1)[..., 0]
    picked = jnp.where(inside, z_t, picked)
    return (m_new, s, picked), None

  init = (jnp.full((B, T), -jnp.inf, jnp.float32), jnp.zeros((B, T), jnp.float32),
          jnp.zeros((B, T), jnp.float32))
  # int32 whatever the ids' dtype: in uint8 the chunk starts would wrap at 256 (wrong columns)
  starts = jnp.arange(n, dtype=jnp.int32) * vocab_chunk
  (m, s, picked), _ = jax.lax.scan(body, init, (w_NxDxC, starts))
  return picked - (m + jnp.log(s))


def _check_chunk(name: str, value) -> None:
  """A chunk size is None or an integer >= 1 (checked at trace time: Python values only)."""
  if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                            or value < 1):
    raise ConfigError(f"{name} must be an integer >= 1 or None (no chunking), got {value!r}")


def logps_from_hidden(h_BxTxD, w_DxV, targets_BxT, *, chunk: int | None = None,
                      vocab_chunk: int | None = None):
  """Per-position log p(targets[b, t] | h[b, t]) = log softmax(h[b, t] W)[targets[b, t]].

  Args:
    h_BxTxD: final hidden states.
    w_DxV: output projection.
    targets_BxT: the token each position predicts.
    chunk: positions per chunk (None: all at once). T need not be a multiple of it.
    vocab_chunk: vocabulary columns per chunk (None: all at once); V need not be a multiple.
  Returns:
    [B, T] float32 log-probs. With both chunks set, the largest logits block alive at once is
    [B, chunk, vocab_chunk], forward and backward.
  """
  _check_chunk("chunk", chunk)
  _check_chunk("vocab_chunk", vocab_chunk)
  if (jnp.ndim(h_BxTxD) != 3 or jnp.ndim(w_DxV) != 2 or jnp.shape(targets_BxT) !=
      jnp.shape(h_BxTxD)[:2] or jnp.shape(w_DxV)[0] != jnp.shape(h_BxTxD)[2]):
    raise ValueError(f"logps_from_hidden: needs h_BxTxD [B, T, D], w_DxV [D, V] and targets_BxT "
                     f"[B, T]; got {jnp.shape(h_BxTxD)}, {jnp.shape(w_DxV)} and "
                     f"{jnp.shape(targets_BxT)}")
  if not jnp.issubdtype(jnp.result_type(targets_BxT), jnp.integer):
    raise ValueError(f"logps_from_hidden: targets_BxT must be integer token ids, got dtype "
                     f"{jnp.result_type(targets_BxT)}")
  V = w_DxV.shape[1]
  if vocab_chunk is None or vocab_chunk >= V:
    w = w_DxV
    logps_fn = _target_logps
  else:
    w = _vocab_chunks(w_DxV, vocab_chunk)
    logps_fn = lambda h, w_chunks, t: _target_logps_vocab_chunked(h, w_chunks, V, t)
  B, T, D = h_BxTxD.shape
  if chunk is None or chunk >= T:
    return logps_fn(h_BxTxD, w, targets_BxT)
  n = -(-T // chunk)
  pad = n * chunk - T
  h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
  tg = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)
  body = jax.checkpoint(lambda args: logps_fn(args[0], w, args[1]))
  out = jax.lax.map(body, (h, tg))  # [n, B, chunk]
  return out.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]


def token_logps(apply_fn: ApplyFn, params, tokens_BxT, mask_BxT=None, *, chunk: int | None = None,
                vocab_chunk: int | None = None, segment_ids_BxT=None):
  """Per-token log-probs of ``tokens_BxT`` under the model, aligned with the tokens.

      logp[b, t] = log π(tokens[b, t] | tokens[b, <t]) * mask[b, t],   logp[b, 0] = 0

  Args:
    apply_fn: ``(params, tokens_BxT, segment_ids_BxT) -> (hidden_BxTxD, unembed_DxV)``, e.g.
      ``model_apply_fn(graphdef)``.
    params: the parameters ``apply_fn`` takes.
    tokens_BxT: int token ids (prompt and response, right-padded).
    mask_BxT: 1 where a token's log-prob counts (usually the response tokens); None keeps all
      positions t >= 1.
    chunk: sequence chunk for the output projection (see module docstring).
    vocab_chunk: vocabulary chunk for the output projection (online log-sum-exp over chunks).
    segment_ids_BxT: passed to the model (0 = padding, distinct ids = packed sequences).
  Returns:
    logps_BxT float32, zero where the mask is zero and at t = 0.
  """
  tokens_BxT = jnp.asarray(tokens_BxT)
  shape = tokens_BxT.shape
  if len(shape) != 2 or shape[1] < 1:
    raise ValueError(f"token_logps: tokens_BxT must be [B, T] with T >= 1, got shape {shape}")
  if not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
    raise ValueError(f"token_logps: tokens_BxT must be integer token ids, got dtype "
                     f"{tokens_BxT.dtype}")
  for name, a in (("mask_BxT", mask_BxT), ("segment_ids_BxT", segment_ids_BxT)):
    # [B, T], or [1, T] / [B, 1] broadcast over the batch / positions; never [B, T - 1] (the
    # targets' shape) or [B] (which would broadcast over positions when B == T)
    if a is not None and (jnp.ndim(a) != 2 or any(
        d not in (1, n) for d, n in zip(jnp.shape(a), shape))):
      raise ValueError(f"token_logps: {name} must be [B, T] like tokens_BxT {shape}, got shape "
                       f"{jnp.shape(a)}")
  h, w = apply_fn(params, tokens_BxT, segment_ids_BxT)
  logps = logps_from_hidden(h[:, :-1], w, tokens_BxT[:, 1:], chunk=chunk,
                            vocab_chunk=vocab_chunk)
  logps = jnp.pad(logps, ((0, 0), (1, 0)))
  if segment_ids_BxT is not None:  # the first token of a packed segment has no prediction
    first = jnp.pad(segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1], ((0, 0), (1, 0)),
                    constant_values=True)
    logps = jnp.where(first, 0.0, logps)
  if mask_BxT is not None:
    logps = logps * mask_BxT.astype(logps.dtype)
  return logps
