"""The one place where tokens become per-token log-probabilities.

    logp[b, t] = log softmax(h[b, t-1] W)[tokens[b, t]]   for t >= 1,   logp[b, 0] = 0

The next-token shift happens here and nowhere else: the result is aligned with ``tokens_BxT`` so a
response mask over tokens applies to it directly (``logps_BxT * mask_BxT``). Every trainer, the
sampler's contract test and the evaluation code go through ``token_logps``.

With ``chunk=C`` the output projection and the log-softmax run over C positions at a time under
``jax.checkpoint``, so the full [B, T, V] logits never exist, in the forward or the backward pass.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

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


def logps_from_hidden(h_BxTxD, w_DxV, targets_BxT, *, chunk: int | None = None):
  """Per-position log p(targets[b, t] | h[b, t]) = log softmax(h[b, t] W)[targets[b, t]].

  Args:
    h_BxTxD: final hidden states.
    w_DxV: output projection.
    targets_BxT: the token each position predicts.
    chunk: positions per chunk (None: all at once). T need not be a multiple of it.
  Returns:
    [B, T] float32 log-probs.
  """
  B, T, D = h_BxTxD.shape
  if chunk is None or chunk >= T:
    return _target_logps(h_BxTxD, w_DxV, targets_BxT)
  n = -(-T // chunk)
  pad = n * chunk - T
  h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
  tg = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)
  body = jax.checkpoint(lambda args: _target_logps(args[0], w_DxV, args[1]))
  out = jax.lax.map(body, (h, tg))  # [n, B, chunk]
  return out.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]


def token_logps(apply_fn: ApplyFn, params, tokens_BxT, mask_BxT=None, *, chunk: int | None = None,
                segment_ids_BxT=None):
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
    segment_ids_BxT: passed to the model (0 = padding, distinct ids = packed sequences).
  Returns:
    logps_BxT float32, zero where the mask is zero and at t = 0.
  """
  h, w = apply_fn(params, tokens_BxT, segment_ids_BxT)
  logps = logps_from_hidden(h[:, :-1], w, tokens_BxT[:, 1:], chunk=chunk)
  logps = jnp.pad(logps, ((0, 0), (1, 0)))
  if segment_ids_BxT is not None:  # the first token of a packed segment has no prediction
    first = jnp.pad(segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1], ((0, 0), (1, 0)),
                    constant_values=True)
    logps = jnp.where(first, 0.0, logps)
  if mask_BxT is not None:
    logps = logps * mask_BxT.astype(logps.dtype)
  return logps
