"""Reference of one decode step's attention over a KV cache (pure jnp): what the kernel must equal.

    out[b, h] = sum_{s < L_b} softmax_s(q[b, h] . k[b, s, h // G] / sqrt(D)) v[b, s, h // G]

with G = H / K query heads per key/value head (grouped-query attention, Ainslie et al. 2023) and
L_b the number of valid cache slots of row b (slots 0 .. L_b - 1; ``Transformer.hidden_states``
with a cache masks slot <= position, so L_b = position + 1). Softmax in float32, probabilities cast
to the cache dtype before the product with v, as ``postrl.models.transformer.dot_product_attention``.
"""

from __future__ import annotations

import jax.numpy as jnp

from postrl.models.transformer import dot_product_attention


def decode_attention_reference(q_BxHxD, k_BxSxKxD, v_BxSxKxD, lengths_B):
  """[B, H, D] attention of one query per row over the first ``lengths_B[b]`` cache slots."""
  S = k_BxSxKxD.shape[1]
  mask_Bx1xS = jnp.arange(S)[None, None, :] < lengths_B[:, None, None]
  out = dot_product_attention(q_BxHxD[:, None].astype(k_BxSxKxD.dtype), k_BxSxKxD, v_BxSxKxD,
                              mask_Bx1xS)
  return out[:, 0]
