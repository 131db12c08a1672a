"""Prompt tuning and prefix tuning: trainable virtual tokens / per-layer key-value prefixes.

Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").
P trainable input embeddings E_p [P, D] are prepended to every sequence's token embeddings:

    h_0 = [E_p ; E[tokens]],   positions 0..P-1 for E_p and P, P+1, ... for the tokens,

and the outputs at the P virtual positions are dropped, so the model still returns [B, T, ...].
Because the virtual tokens come first and attend only to each other (causal), their per-layer
keys and values do not depend on the sequence: ``Transformer.virtual_kv`` computes them once per
forward (batch 1) and every real query attends them before its own sequence. This is exactly the
prepended model (tested), works with packed rows (every segment sees the virtual tokens, its own
positions start at P) and with the KV-cache sampler (the cache holds only real tokens; RoPE runs
at slot + P). Initialisation: embeddings of P vocabulary tokens drawn with the seed (Lester et
al. §3.2: "sampled vocab" init).

Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").
Every layer l gets P trainable key/value pairs K_p^l, V_p^l [P, Hkv, Dh] that every query attends
before its sequence:

    Attn_l(x) = softmax(q [K_p^l ; K_x]^T / sqrt(d)) [V_p^l ; V_x]

Real tokens keep positions 0..T-1; the prefix keys are used as stored (no RoPE). Works with packing
and with the KV-cache sampler (the prefix is not in the cache; each step attends it).
Initialisation: the keys/values that P sampled vocabulary tokens produce in the model (Li & Liang
§7.2 found initialising with real-word activations much better than random). The paper's MLP
reparametrisation of the prefix is not used (they report it matters for stability at large lr;
we train the prefix directly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from postrl.models.config import dtype_from_name
from postrl.models.transformer import Transformer, rope_inv_freq
from postrl.peft.lora import AdapterParam, PEFTError, _check_seed


class PromptEmbeddings(nnx.Module):
  """P virtual-token embeddings [P, D] (``Transformer.prompt``)."""

  def __init__(self, embeddings_PxD):
    self.embeddings = AdapterParam(embeddings_PxD, sharding_names=(None, "embed"),
                                   eager_sharding=False)
    self.num_virtual_tokens = int(embeddings_PxD.shape[0])

  def __call__(self):
    return self.embeddings[...]


class PrefixKV(nnx.Module):
  """One layer's P key/value prefix pairs [P, Hkv, Dh] (``Attention.prefix``)."""

  def __init__(self, k_PxHxD, v_PxHxD):
    self.k = AdapterParam(k_PxHxD, sharding_names=(None, "kv_heads", None), eager_sharding=False)
    self.v = AdapterParam(v_PxHxD, sharding_names=(None, "kv_heads", None), eager_sharding=False)
    self.num_virtual_tokens = int(k_PxHxD.shape[0])

  def __call__(self):
    return self.k[...][None], self.v[...][None]


def _check(model, num_virtual_tokens, seed):
  if not isinstance(model, Transformer):
    raise PEFTError(f"prompt / prefix tuning needs a postrl Transformer, got "
                    f"{type(model).__name__}")
  if (not isinstance(num_virtual_tokens, int) or isinstance(num_virtual_tokens, bool)
      or num_virtual_tokens <= 0):
    raise PEFTError(f"config.peft.num_virtual_tokens must be a positive integer, got "
                    f"{num_virtual_tokens!r}")
  max_positions = model.config.max_position_embeddings
  # prompt tuning puts the real tokens at positions P, P+1, ...; both methods initialise by
  # running the P virtual tokens through the model at positions 0..P-1
  if num_virtual_tokens >= max_positions:
    raise PEFTError(f"config.peft.num_virtual_tokens={num_virtual_tokens} leaves no position for "
                    f"the real tokens: the model has max_position_embeddings={max_positions}")
  _check_seed(seed)
  if getattr(model, "prompt", None) is not None or any(
      getattr(layer.self_attn, "prefix", None) is not None for layer in model.layers):
    raise PEFTError("the model already has prompt or prefix adapters")


def _sampled_vocab_embeddings(model: Transformer, num_virtual_tokens: int, seed: int):
  ids = jax.random.randint(jax.random.key(seed), (num_virtual_tokens,), 0,
                           model.config.vocab_size)
  return jnp.take(model.embed_tokens[...], ids, axis=0)


def apply_prompt_tuning(model: Transformer, *, num_virtual_tokens: int,
                        seed: int = 0) -> Transformer:
  """Adds ``num_virtual_tokens`` trainable input embeddings (module docstring), in place."""
  _check(model, num_virtual_tokens, seed)
  model.prompt = nnx.data(PromptEmbeddings(
      _sampled_vocab_embeddings(model, num_virtual_tokens, seed)))
  return model


def apply_prefix_tuning(model: Transformer, *, num_virtual_tokens: int,
                        seed: int = 0) -> Transformer:
  """Adds trainable per-layer key/value prefixes (module docstring), in place."""
  _check(model, num_virtual_tokens, seed)
  emb = _sampled_vocab_embeddings(model, num_virtual_tokens, seed)
  kvs = model.virtual_kv(emb[None].astype(dtype_from_name(model.config.dtype)),
                         rope_inv_freq(model.config))
  pdt = model.embed_tokens[...].dtype
  for layer, (k, v) in zip(model.layers, kvs):
    layer.self_attn.prefix = nnx.data(PrefixKV(k[0].astype(pdt), v[0].astype(pdt)))
  return model
