"""Reference of one decoder layer's cached one-token step (pure jnp): what the fused kernels must
equal. It is the model's own arithmetic (``postrl.models.transformer.Block`` at T = 1 with a
cache), written over the weights dict that ``kernels.decode_block.decode_layer`` takes:

    n = RMSNorm(x);  q, k = RoPE(n W_q), RoPE(n W_k);  v = n W_v        (+ biases)
    cache[b, pos_b] = (k, v);  a = x + Attn(q, cache[:, :pos_b + 1]) W_o  (+ bias)
    x' = a + W_down (silu(m W_gate) * m W_up),  m = RMSNorm(a)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.decode_attention import decode_attention
from kernels.decode_attention.reference import decode_attention_reference
from postrl.models.transformer import apply_rope, dense, rms_norm, write_slots


def attention_half_reference(x_BxD, positions_B, inv_freq, weights: dict, cache_k, cache_v, *,
                             eps: float, dtype, attention_impl: str = "xla",
                             interpret: bool = False):
  """(a [B, D], cache_k, cache_v): the residual stream after the attention half of the layer,
  a = x + Attn(RoPE(n W_q), cache + RoPE(n W_k), cache + n W_v) W_o, n = RMSNorm(x).

  ``attention_impl``: "xla", the masked attention of ``decode_attention_reference`` (the exact
  reference); "auto" / "pallas", ``kernels.decode_attention`` as the model's cached step runs it
  (``ModelConfig.decode_attention_impl``: the flash-decoding kernel on one GPU)."""
  B, _ = x_BxD.shape
  K, Dh = cache_k.shape[2:]
  H = weights["q"].shape[1] // Dh
  x = x_BxD.astype(dtype)
  n = rms_norm(x, weights["input_norm"], eps, dtype)
  pos_Bx1 = positions_B[:, None]
  q = dense(n, weights["q"], weights.get("q_bias"), dtype).reshape(B, 1, H, Dh)
  k = dense(n, weights["k"], weights.get("k_bias"), dtype).reshape(B, 1, K, Dh)
  v = dense(n, weights["v"], weights.get("v_bias"), dtype).reshape(B, 1, K, Dh)
  q, k = apply_rope(q, pos_Bx1, inv_freq), apply_rope(k, pos_Bx1, inv_freq)
  cache_k, cache_v = write_slots(cache_k, pos_Bx1, k), write_slots(cache_v, pos_Bx1, v)
  if attention_impl == "xla":
    attn = decode_attention_reference(q[:, 0], cache_k, cache_v, positions_B + 1)
  else:
    attn = decode_attention(q[:, 0], cache_k, cache_v, positions_B + 1, impl=attention_impl,
                            interpret=interpret)
  attn = attn.astype(dtype)
  a = x + dense(attn.reshape(B, H * Dh), weights["o"], weights.get("o_bias"), dtype)
  return a, cache_k, cache_v


def mlp_half_reference(a_BxD, weights: dict, *, eps: float, dtype):
  """x' [B, D] = a + W_down (silu(m W_gate) * m W_up), m = RMSNorm(a): the MLP half."""
  a = a_BxD.astype(dtype)
  m = rms_norm(a, weights["post_norm"], eps, dtype)
  act = (jax.nn.silu(dense(m, weights["gate"], weights.get("gate_bias"), dtype))
         * dense(m, weights["up"], weights.get("up_bias"), dtype))
  return a + dense(act, weights["down"], weights.get("down_bias"), dtype)


def decode_layer_reference(x_BxD, positions_B, inv_freq, weights: dict, cache_k, cache_v, *,
                           eps: float, dtype, config=None, interpret: bool = False,
                           attention_impl: str = "xla"):
  """(x' [B, D], cache_k, cache_v) of one layer at one cached step (module doc): the attention
  half (its attention by ``attention_impl``, see ``attention_half_reference``), then the MLP
  half."""
  del config  # the fused kernels' settings; the reference has none
  a, cache_k, cache_v = attention_half_reference(x_BxD, positions_B, inv_freq, weights, cache_k,
                                                 cache_v, eps=eps, dtype=dtype,
                                                 attention_impl=attention_impl,
                                                 interpret=interpret)
  return mlp_half_reference(a, weights, eps=eps, dtype=dtype), cache_k, cache_v
