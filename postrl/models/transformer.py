"""A Llama / Qwen2 / SmolLM2 decoder in Flax NNX.

Architecture (Touvron et al. 2023, "Llama 2"; Dubey et al. 2024, "The Llama 3 Herd of Models";
Qwen Team 2024, "Qwen2 Technical Report"):

    h_0 = E[tokens]
    a_l = h_{l-1} + W_o Attn(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(h_{l-1})
    h_l = a_l + W_down (silu(W_gate m) * W_up m),                 m = RMSNorm(a_l)
    logits = RMSNorm(h_L) W_unembed                               (W_unembed = E^T when tied)

    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)                    (Zhang & Sennrich 2019)
    Attn: grouped-query (Ainslie et al. 2023): query head h reads key/value head h // (Hq / Hkv).

Every matrix is stored as ``[in, out]`` (transformers stores ``[out, in]``; the importer transposes)
and every parameter carries logical axis names (``sharding_names``) that ``postrl.sharding`` maps to
mesh axes. Parameters are kept in ``param_dtype``; activations and matmuls run in ``dtype``; the
norms, the softmax and RoPE's angles run in float32.

Masks: without a cache, token i attends token j iff ``j <= i`` and both carry the same segment id
(``segment_ids_BxT``: 0 marks padding, distinct ids mark packed sequences). With a KV cache, cache
slot s holds position s, and a query at position p attends slots ``s <= p``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from postrl.models.config import ConfigError, ModelConfig, dtype_from_name

_NEG_INF = -1e30  # finite so fully-masked rows (padding queries) never produce NaN


def _param(value, names):
  # eager_sharding=False: sharding is applied later, by name, in postrl.sharding.
  return nnx.Param(value, sharding_names=names, eager_sharding=False)


class KVCache(NamedTuple):
  """Per-layer key/value buffers, ``k[l]`` and ``v[l]`` of shape [B, S, Hkv, Dh]."""
  k: tuple
  v: tuple

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
    shape = (batch, length, cfg.num_key_value_heads, cfg.dim_per_head)
    dt = dtype_from_name(cfg.dtype)
    return cls(k=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_hidden_layers)),
               v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_hidden_layers)))

  @property
  def length(self) -> int:
    return self.k[0].shape[1]


# ----------------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig):
  """Inverse frequencies θ_i = base^(-2i/d), with Llama-3 or linear scaling applied.

  Llama-3 scaling (Dubey et al. 2024; transformers ``_compute_llama3_parameters``): wavelengths
  longer than ``L/low_freq_factor`` are divided by ``factor``, shorter than ``L/high_freq_factor`` kept,
  and the band between interpolated smoothly.
  """
  d = cfg.dim_per_head
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if not cfg.rope_scaling:
    return inv_freq
  scaling = dict(cfg.rope_scaling)
  kind = scaling.get("rope_type", scaling.get("type"))
  factor = float(scaling.get("factor", 1.0))
  if kind == "linear":
    return inv_freq / factor
  if kind == "llama3":
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x_BxTxHxD, positions_BxT, inv_freq):
  """Rotary embedding (Su et al. 2021) in the half-split layout transformers uses:
  x' = x cos(pθ) + rotate_half(x) sin(pθ), rotate_half([a, b]) = [-b, a]."""
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x_BxTxHxD.dtype), jnp.sin(angles).astype(x_BxTxHxD.dtype)
  a, b = jnp.split(x_BxTxHxD, 2, axis=-1)
  return x_BxTxHxD * cos + jnp.concatenate([-b, a], axis=-1) * sin


# ----------------------------------------------------------------------------------- layers


class Linear(nnx.Module):
  """y = x W (+ b), W stored [in, out] with logical axis names.

  ``kernel`` is a float ``nnx.Param`` [K, N], or, after ``postrl.quant.quantize_model``, a
  ``postrl.quant.QuantizedWeight`` (int8 / packed int4 / NF4 storage, not trainable) whose
  ``dot`` is the library's one quantized matmul (``postrl.quant.formats.quantized_dot``).

  ``postrl.peft.apply_lora`` attaches an adapter module as ``self.lora`` (LoRA / DoRA, not merged):
  the layer's output is then ``lora(self, x)`` (base + low-rank update + bias, see
  ``postrl.peft.lora``). Without an adapter the layer has no ``lora`` attribute and the path
  below is unchanged.
  """

  def __init__(self, d_in, d_out, names, *, bias, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt = dtype_from_name(cfg.param_dtype)
    self.kernel = _param(jax.random.normal(rngs.params(), (d_in, d_out), pdt) * 0.02, names)
    self.bias = _param(jnp.zeros((d_out,), pdt), names[1:]) if bias else None
    self.dtype = dtype_from_name(cfg.dtype)

  @property
  def quantized(self) -> bool:
    """Whether the kernel is quantized storage rather than a float parameter."""
    return not isinstance(self.kernel, nnx.Variable)

  def dense_kernel(self, dtype=None):
    """W as a float [K, N] array (dequantised when quantized), in ``dtype`` (default: stored /
    float32 for quantized kernels)."""
    w = self.kernel.dequantize() if self.quantized else self.kernel[...]
    return w if dtype is None else w.astype(dtype)

  def __call__(self, x):
    x = x.astype(self.dtype)
    adapter = getattr(self, "lora", None)
    if adapter is not None and not adapter.merged:
      return adapter(self, x)
    if self.quantized:
      y = self.kernel.dot(x)
      return y if self.bias is None else y + self.bias[...].astype(self.dtype)
    return dense(x, self.kernel[...], None if self.bias is None else self.bias[...], self.dtype)


def dense(x, w, b, dtype):
  """x W (+ b) in ``dtype``: the float ``Linear`` (its rounding points: the product rounded to
  ``dtype``, then the bias added in ``dtype``), a pure function that ``kernels.decode_block``'s
  reference shares."""
  y = jnp.dot(x.astype(dtype), w.astype(dtype))
  return y if b is None else y + b.astype(dtype)


class RMSNorm(nnx.Module):
  """w * x / sqrt(mean(x^2) + eps), normalised in float32 (Zhang & Sennrich 2019)."""

  def __init__(self, dim, *, cfg: ModelConfig):
    self.weight = _param(jnp.ones((dim,), dtype_from_name(cfg.param_dtype)), ("norm",))
    self.eps = cfg.rms_norm_eps
    self.dtype = dtype_from_name(cfg.dtype)

  def __call__(self, x):
    return rms_norm(x, self.weight[...], self.eps, self.dtype)


def rms_norm(x, w, eps: float, dtype):
  """w * x / sqrt(mean(x^2) + eps), normalised in float32 and rounded to ``dtype`` before the
  product with w (Zhang & Sennrich 2019): ``RMSNorm``, as a pure function."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return w.astype(dtype) * y.astype(dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.dim_per_head
    self.num_heads, self.num_kv_heads, self.head_dim = (
        cfg.num_attention_heads, cfg.num_key_value_heads, hd)
    self.q_proj = Linear(d, self.num_heads * hd, ("embed", "q_heads"), bias=cfg.qkv_bias,
                         cfg=cfg, rngs=rngs)
    self.k_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias,
                         cfg=cfg, rngs=rngs)
    self.v_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias,
                         cfg=cfg, rngs=rngs)
    self.o_proj = Linear(self.num_heads * hd, d, ("q_heads", "embed"), bias=cfg.o_bias,
                         cfg=cfg, rngs=rngs)
    self.attention_impl, self.compute_dtype = cfg.attention_impl, cfg.dtype
    self.decode_attention_impl = cfg.decode_attention_impl

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, inv_freq, kv=None, prefix_kv=None,
               rope_positions_BxT=None):
    """Self-attention of ``x`` [B, T, D]; returns (output, updated cache slice or None).

    ``positions_BxT`` are the cache slots (and the RoPE positions unless ``rope_positions_BxT``
    is given). ``prefix_kv`` = (k, v), each [B or 1, P, Hkv, Dh]: key/value pairs every query
    attends before the sequence's own (prefix / prompt tuning, ``postrl.peft``); without it
    ``self.prefix`` (a ``postrl.peft`` prefix module) is used when present.
    """
    B, T, _ = x_BxTxD.shape
    q = self.q_proj(x_BxTxD).reshape(B, T, self.num_heads, self.head_dim)
    k = self.k_proj(x_BxTxD).reshape(B, T, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_BxTxD).reshape(B, T, self.num_kv_heads, self.head_dim)
    rope_pos = positions_BxT if rope_positions_BxT is None else rope_positions_BxT
    q, k = apply_rope(q, rope_pos, inv_freq), apply_rope(k, rope_pos, inv_freq)
    if prefix_kv is None and getattr(self, "prefix", None) is not None:
      prefix_kv = self.prefix()
    if kv is not None:  # write this chunk into its slots (slot == position), read the whole cache
      cache_k, cache_v = kv
      k = write_slots(cache_k, positions_BxT, k)
      v = write_slots(cache_v, positions_BxT, v)
      kv = (k, v)
    if prefix_kv is not None:  # every query also attends the P prefix pairs
      pk, pv = (jnp.broadcast_to(a, (B, *a.shape[1:])).astype(k.dtype) for a in prefix_kv)
      k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
      mask_BxTxS = jnp.broadcast_to(mask_BxTxS, (B, T, mask_BxTxS.shape[-1]))
      mask_BxTxS = jnp.concatenate([jnp.ones((B, T, pk.shape[1]), bool), mask_BxTxS], axis=-1)
    full_impl = full_attention_impl(self.attention_impl, self.compute_dtype, self.head_dim, T)
    if kv is None and prefix_kv is None and full_impl != "xla":
      out = fused_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask_BxTxS,
                            implementation=full_impl)
    elif kv is not None and prefix_kv is None and T == 1 and _decode_kernel(
        self.decode_attention_impl, self.num_heads, self.num_kv_heads, self.head_dim):
      # one cached step: the cache mask of ``hidden_states`` is slot <= position, so row b's
      # valid slots are 0 .. position; the kernel reads only those
      from kernels.decode_attention import decode_attention  # pylint: disable=import-outside-toplevel
      out = decode_attention(q[:, 0], k, v, positions_BxT[:, 0] + 1, impl="pallas",
                             interpret=jax.default_backend() == "cpu")[:, None].astype(q.dtype)
    else:
      out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask_BxTxS)
    return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim)), kv


def _decode_kernel(impl: str, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
  """Whether a cached one-token step runs ``kernels.decode_attention``'s kernel: "pallas" always
  (a head layout the kernel cannot take is then a clear error), "auto" on one GPU
  (``kernels.decode_attention.choose_impl``) for head layouts it takes, "xla" never."""
  if impl == "xla":
    return False
  # pylint: disable=import-outside-toplevel
  from kernels.decode_attention import GpuConfig, KernelShapeError, choose_impl
  from kernels.decode_attention.gpu import check_shapes
  if impl == "pallas":
    return True
  try:
    check_shapes(num_heads, num_kv_heads, head_dim, GpuConfig())
  except KernelShapeError:
    return False
  return choose_impl(impl) == "pallas"


def write_slots(cache_BxSxKxD, slots_BxT, x_BxTxKxD):
  """cache[b, slots[b, t]] = x[b, t]; slots past the cache are dropped.

  Written per row (``vmap``), so the scatter carries the batch as a batching dimension: with the
  rows split over devices, each device writes its own rows and nothing is gathered."""
  def one(cache_SxKxD, slots_T, x_TxKxD):
    return cache_SxKxD.at[slots_T].set(x_TxKxD.astype(cache_SxKxD.dtype), mode="drop")
  return jax.vmap(one)(cache_BxSxKxD, slots_BxT, x_BxTxKxD)


def dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS):
  """softmax(q k^T / sqrt(d) + mask) v with grouped-query heads; softmax in float32."""
  B, T, H, D = q_BxTxHxD.shape
  K = k_BxSxKxD.shape[2]
  q = q_BxTxHxD.reshape(B, T, K, H // K, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxD,
                      preferred_element_type=jnp.float32) / math.sqrt(D)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxD.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD)
  return out.reshape(B, T, H, D)


CUDNN_HEAD_DIMS = range(8, 129, 8)  # head dims cuDNN's flash attention takes, fwd and bwd


def _flash_capable(device) -> bool:
  """An NVIDIA GPU of compute capability >= 8.0 (Ampere on), where cuDNN's flash attention runs;
  older NVIDIA GPUs and ROCm devices keep the einsum."""
  try:
    cuda = "cuda" in device.client.platform_version.lower()
    capability = tuple(int(x) for x in str(device.compute_capability).split(".")[:2])
  except (AttributeError, ValueError):
    return False
  return cuda and capability >= (8, 0)


def full_attention_impl(impl: str, dtype: str, head_dim: int, seq_len: int) -> str:
  """How a full-sequence forward of ``seq_len`` tokens attends, for ``ModelConfig.attention_impl``.

  "xla" / "cudnn" as given. "auto": "cudnn" (``fused_attention``) on a single NVIDIA GPU when the
  compute ``dtype`` (a name) is bfloat16 / float16, ``head_dim`` is in ``CUDNN_HEAD_DIMS`` and
  ``seq_len`` is even (cuDNN's flash attention refuses odd lengths with a mask in training),
  else "xla" (``dot_product_attention``). Measured on an H200 (2026-11-26, ``benchmarks/train_step.py``,
  Llama-3.2-1B shape, seq 2048, 4 sequences per step): SFT 55.6k vs 24.8k tokens/s, DPO 58.0k vs
  25.4k (46-48% vs 21% of the datasheet bf16 peak). Several devices keep "xla" until cuDNN's
  sharded call is timed there. Both compute the same function (``fused_attention``).
  """
  if impl != "auto":
    return impl
  on_one_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1 and _flash_capable(
      jax.devices()[0])
  half = jnp.dtype(dtype_from_name(dtype)) in (jnp.bfloat16, jnp.float16)
  fits = head_dim in CUDNN_HEAD_DIMS and seq_len % 2 == 0
  return "cudnn" if on_one_gpu and half and fits else "xla"


def fused_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxT, *, implementation="cudnn"):
  """Causal self-attention through ``jax.nn.dot_product_attention`` (cuDNN flash attention).

  The same function as ``dot_product_attention``, softmax(q k^T / sqrt(d) + mask) v with grouped
  query heads (Dao 2023, "FlashAttention-2": the [T, T] scores are never stored; the backward
  pass recomputes them blockwise). ``mask_BxTxT`` is the model's causal & same-segment mask; it is
  passed whole (cuDNN applies it as an additive bias) and ``is_causal`` lets cuDNN skip the
  blocks above the diagonal. ``implementation="xla"`` runs JAX's reference of the same call
  (what the CPU tests compare against ``dot_product_attention``).
  """
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ConfigError(f"attention_impl='cudnn' needs an NVIDIA GPU with cuDNN; the JAX backend is "
                      f"{jax.default_backend()!r} (use attention_impl='xla')")
  return jax.nn.dot_product_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD,
                                      mask=mask_BxTxT[:, None], is_causal=True,
                                      implementation=implementation)


class MLP(nnx.Module):
  """SwiGLU feed-forward (Shazeer 2020): W_down (silu(x W_gate) * x W_up)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Linear(d, f, ("embed", "mlp"), bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
    self.up_proj = Linear(d, f, ("embed", "mlp"), bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
    self.down_proj = Linear(f, d, ("mlp", "embed"), bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm residual block: attention then SwiGLU MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg=cfg)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg=cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def fused_decode_blocker(self) -> str | None:
    """Why ``kernels.decode_block`` cannot run this block (None: it can): it takes float weights
    without an unmerged LoRA / DoRA adapter and no prefix tuning."""
    if getattr(self.self_attn, "prefix", None) is not None:
      return "prefix tuning"
    attn, mlp = self.self_attn, self.mlp
    for name, lin in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj),
                      ("o_proj", attn.o_proj), ("gate_proj", mlp.gate_proj),
                      ("up_proj", mlp.up_proj), ("down_proj", mlp.down_proj)):
      if lin.quantized:
        return f"{name} is quantized"
      adapter = getattr(lin, "lora", None)
      if adapter is not None and not adapter.merged:
        return f"{name} has an unmerged adapter"
    return None

  def decode_weights(self) -> dict:
    """The block's arrays by ``kernels.decode_block.WEIGHT_NAMES`` (and biases where present)."""
    attn, mlp = self.self_attn, self.mlp
    out = dict(input_norm=self.input_layernorm.weight[...], q=attn.q_proj.kernel[...],
               k=attn.k_proj.kernel[...], v=attn.v_proj.kernel[...], o=attn.o_proj.kernel[...],
               post_norm=self.post_attention_layernorm.weight[...],
               gate=mlp.gate_proj.kernel[...], up=mlp.up_proj.kernel[...],
               down=mlp.down_proj.kernel[...])
    for name, lin in (("q_bias", attn.q_proj), ("k_bias", attn.k_proj), ("v_bias", attn.v_proj),
                      ("o_bias", attn.o_proj), ("gate_bias", mlp.gate_proj),
                      ("up_bias", mlp.up_proj), ("down_bias", mlp.down_proj)):
      if lin.bias is not None:
        out[name] = lin.bias[...]
    return out

  def __call__(self, x, positions, mask, inv_freq, kv=None, prefix_kv=None, rope_positions=None):
    attn, kv = self.self_attn(self.input_layernorm(x), positions, mask, inv_freq, kv, prefix_kv,
                              rope_positions)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), kv


# ----------------------------------------------------------------------------------- model


def _call_block(layer, *args):
  return layer(*args)


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_block(policy: str):
  """``_call_block`` under ``nnx.remat`` with ``ModelConfig.remat``'s policy ("none": as is).

  Rematerialisation (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): the
  backward pass recomputes what the policy does not save, from each block's saved input."""
  if policy == "none":
    return _call_block
  return nnx.remat(_call_block, policy=_REMAT[policy])


def positions_from_segments(segment_ids_BxT):
  """Index of each token within its run of equal segment ids (0, 1, 2, ... restarting per run)."""
  T = segment_ids_BxT.shape[1]
  idx = jnp.arange(T)[None, :]
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], bool),
       segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


class Transformer(nnx.Module):
  """Decoder-only LM. ``model(tokens_BxT)`` -> logits_BxTxV; see the module docstring."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    pdt = dtype_from_name(cfg.param_dtype)
    self.embed_tokens = _param(
        jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt) * 0.02,
        ("vocab", "embed"))
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg=cfg)
    self.lm_head = None if cfg.tie_word_embeddings else _param(
        jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt) * 0.02,
        ("embed", "vocab"))

  # The pieces are public so that log-prob chunking, value heads and reward heads reuse them.
  def hidden_states(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None, cache=None):
    """Final-norm hidden states [B, T, D] (and the updated cache when one is given).

    Args:
      tokens_BxT: int token ids.
      positions_BxT: RoPE positions; default: index within each segment.
      segment_ids_BxT: 0 = padding, equal ids attend each other (packing); default all ones.
        Ignored with a cache.
      cache: a ``KVCache``; tokens are written at slots ``positions_BxT`` (required with a cache).
    """
    cfg = self.config
    dt = dtype_from_name(cfg.dtype)
    B, T = tokens_BxT.shape
    if cache is not None:
      if positions_BxT is None:
        raise ValueError("hidden_states with a KV cache needs positions_BxT (the cache slots)")
      slots = jnp.arange(cache.length)
      mask = slots[None, None, :] <= positions_BxT[:, :, None]
    else:
      seg = jnp.ones((B, T), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT
      if positions_BxT is None:
        positions_BxT = positions_from_segments(seg)
      causal = jnp.tril(jnp.ones((T, T), bool))[None]
      mask = causal & (seg[:, :, None] == seg[:, None, :])
    inv_freq = rope_inv_freq(cfg)
    x = jnp.take(self.embed_tokens[...], tokens_BxT, axis=0).astype(dt)
    if cache is not None and T == 1 and self._fused_decode(B):
      return self._fused_decode_layers(x[:, 0], positions_BxT[:, 0], cache, inv_freq)
    # prompt tuning (postrl.peft): virtual tokens at positions 0..P-1 before every sequence
    prompt = getattr(self, "prompt", None)
    prompt_kv, rope_positions = None, None
    if prompt is not None:
      prompt_kv = self.virtual_kv(prompt()[None].astype(dt), inv_freq)
      rope_positions = positions_BxT + prompt.num_virtual_tokens
    new_k, new_v = [], []
    run_layer = _remat_block(cfg.remat) if cache is None else _call_block
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, kv = run_layer(layer, x, positions_BxT, mask, inv_freq, kv,
                        None if prompt_kv is None else prompt_kv[i], rope_positions)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    x = self.norm(x)
    if cache is None:
      return x
    return x, KVCache(tuple(new_k), tuple(new_v))

  def _fused_decode(self, batch: int) -> bool:
    """Whether a cached one-token step of ``batch`` rows runs ``kernels.decode_block``
    (``ModelConfig.decode_block_impl``): "xla" never; "auto" where ``choose_impl`` picks the
    kernels and the model and shapes fit them; any of ``kernels.decode_block.KERNEL_IMPLS``
    always (what does not fit is then a clear error)."""
    cfg = self.config
    impl = cfg.decode_block_impl
    if impl == "xla":
      return False
    # pylint: disable=import-outside-toplevel
    from kernels.decode_block import KernelShapeError, check_shapes, choose_impl, default_config
    if impl == "auto" and choose_impl(impl) == "xla":
      return False
    blocker = ("prompt tuning" if getattr(self, "prompt", None) is not None else
               next((b for b in (layer.fused_decode_blocker() for layer in self.layers) if b),
                    None))
    if blocker is None:
      try:
        d, f, h, dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                       cfg.dim_per_head)
        check_shapes(batch, d, f, h, cfg.num_key_value_heads, dh, default_config(d, f, h, dh))
      except KernelShapeError as e:
        blocker = str(e)
    if blocker is not None and impl != "auto":
      raise ConfigError(f"decode_block_impl={impl!r} cannot run this model's cached step: "
                        f"{blocker}; use decode_block_impl='auto' or 'xla'")
    return blocker is None

  def _xla_attention_impl(self) -> str:
    """How a cached step's attention runs where XLA runs the attention half (``decode_layer``'s
    ``attention_impl``): as ``Attention`` would, by ``decode_attention_impl``."""
    cfg = self.config
    use_kernel = _decode_kernel(cfg.decode_attention_impl, cfg.num_attention_heads,
                                cfg.num_key_value_heads, cfg.dim_per_head)
    return "pallas" if use_kernel else "xla"

  def _fused_decode_layers(self, x_BxD, positions_B, cache: KVCache, inv_freq):
    """``hidden_states`` of one cached token per row through ``kernels.decode_block``."""
    # pylint: disable-next=import-outside-toplevel
    from kernels.decode_block import choose_impl, decode_layers
    cfg = self.config
    impl = choose_impl(cfg.decode_block_impl)  # one of the kernel impls (``_fused_decode``)
    x_BxD, new_k, new_v, _ = decode_layers(
        x_BxD, positions_B, inv_freq, [layer.decode_weights() for layer in self.layers],
        cache.k, cache.v, eps=cfg.rms_norm_eps, dtype=dtype_from_name(cfg.dtype), impl=impl,
        interpret=jax.default_backend() == "cpu", attention_impl=self._xla_attention_impl())
    return self.norm(x_BxD[:, None]), KVCache(tuple(new_k), tuple(new_v))

  def virtual_kv(self, x_1xPxD, inv_freq):
    """Per-layer (k, v) [1, P, Hkv, Dh] of P input embeddings run alone through the blocks at
    positions 0..P-1 (causal): what tokens after them attend (prompt tuning, Lester et al. 2021)."""
    P = x_1xPxD.shape[1]
    cfg = self.config
    positions = jnp.arange(P)[None]
    mask = jnp.tril(jnp.ones((P, P), bool))[None]
    shape = (1, P, cfg.num_key_value_heads, cfg.dim_per_head)
    out, x = [], x_1xPxD
    for layer in self.layers:  # a cache of exactly P slots returns each layer's k, v
      zeros = jnp.zeros(shape, x_1xPxD.dtype)
      x, kv = layer(x, positions, mask, inv_freq, (zeros, zeros))
      out.append(kv)
    return out

  def unembed_VxD_or_DxV(self):
    """The output projection as stored: (matrix, is_tied). Tied: E [V, D]; untied: W [D, V]."""
    if self.lm_head is None:
      return self.embed_tokens[...], True
    return self.lm_head[...], False

  def logits(self, h_BxTxD):
    """Hidden states -> logits, accumulated in float32."""
    w, tied = self.unembed_VxD_or_DxV()
    w = w.astype(h_BxTxD.dtype)
    spec = "btd,vd->btv" if tied else "btd,dv->btv"
    return jnp.einsum(spec, h_BxTxD, w, preferred_element_type=jnp.float32)

  def __call__(self, tokens_BxT, *, positions_BxT=None, segment_ids_BxT=None):
    return self.logits(self.hidden_states(
        tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT))

  def decode(self, tokens_BxT, positions_BxT, cache: KVCache):
    """One cached step (prefill or decode): returns (logits_BxTxV float32, new cache)."""
    h, cache = self.hidden_states(tokens_BxT, positions_BxT=positions_BxT, cache=cache)
    return self.logits(h), cache
