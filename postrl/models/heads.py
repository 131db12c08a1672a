"""Scalar heads on the decoder: reward models (one score per sequence) and value / process-reward
heads (one score per token).

    rm = ScoredTransformer(load_pretrained("smollm2-135m-instruct"), rngs=nnx.Rngs(0))
    scores_B = rm(tokens_BxT, segment_ids_BxT)             # read at each row's last real token
    values_BxT = rm.token_scores(tokens_BxT, segment_ids_BxT)

A sequence's score is the head applied to the final hidden state of its last non-padding token,
the token that has seen the whole prompt and response (InstructGPT, Ouyang et al. 2022; the
usual "sequence classification" reading of a decoder). Rows hold one right-padded sequence each
(segment id 1 on real tokens, 0 on padding). Parameters carry logical axis names, so the model
shards with ``postrl.sharding`` like the plain transformer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from postrl.models.config import dtype_from_name
from postrl.models.transformer import Transformer, _param


class ScalarHead(nnx.Module):
  """s = h w + b with w [D, 1], initialised N(0, 1/(D+1)) as in TRL's reward heads, b = 0."""

  def __init__(self, hidden_size: int, *, param_dtype="float32", rngs: nnx.Rngs):
    dt = dtype_from_name(param_dtype)
    std = 1.0 / math.sqrt(hidden_size + 1)
    self.kernel = _param(jax.random.normal(rngs.params(), (hidden_size, 1), dt) * std,
                         ("embed", None))
    self.bias = _param(jnp.zeros((1,), dt), (None,))

  def __call__(self, h_BxTxD):
    h = h_BxTxD.astype(jnp.float32)
    return (h @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32))[..., 0]


def last_token_index(segment_ids_BxT):
  """Index of each row's last token with segment id > 0 (0 for an all-padding row)."""
  T = segment_ids_BxT.shape[1]
  positions = jnp.where(segment_ids_BxT > 0, jnp.arange(T)[None, :], -1)
  return jnp.maximum(positions.max(axis=1), 0)


class ScoredTransformer(nnx.Module):
  """A decoder backbone with a scalar head: reward model, value model or process-reward model."""

  def __init__(self, backbone: Transformer, *, rngs: nnx.Rngs):
    self.backbone = backbone
    self.head = ScalarHead(backbone.config.hidden_size, param_dtype=backbone.config.param_dtype,
                           rngs=rngs)

  def token_scores(self, tokens_BxT, segment_ids_BxT=None):
    """Per-token scores [B, T] float32 (values for PPO, step scores for a PRM)."""
    h = self.backbone.hidden_states(tokens_BxT, segment_ids_BxT=segment_ids_BxT)
    return self.head(h)

  def __call__(self, tokens_BxT, segment_ids_BxT=None):
    """Sequence scores [B] float32, read at each row's last real token."""
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    h = self.backbone.hidden_states(tokens_BxT, segment_ids_BxT=segment_ids_BxT)
    idx = last_token_index(segment_ids_BxT)
    h_last = jnp.take_along_axis(h, idx[:, None, None], axis=1)  # [B, 1, D]
    return self.head(h_last)[:, 0]
