"""ModelConfig: the hyper-parameters of a Llama / Qwen2 / SmolLM2 decoder.

One frozen dataclass covers both families; the differences are flags:

* Llama 2 / 3 / SmolLM2: ``qkv_bias=False``; Llama 3.1+ adds ``rope_scaling`` of type ``"llama3"``.
* Qwen2 / Qwen2.5: ``qkv_bias=True`` (bias on q, k and v projections, none on o).

``ModelConfig.from_hf`` reads a transformers ``config.json`` and ``to_hf`` writes one back, so a
checkpoint round-trips through ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
DECODE_ATTENTION_IMPLS = ("auto", "xla", "pallas")
DECODE_BLOCK_IMPLS = ("auto", "xla", "pallas", "pallas_attention", "pallas_mlp",
                      "pallas_persistent")
REMAT_POLICIES = ("none", "full", "dots")
# How the model computes, not what: the same function whichever value (tested), so a checkpoint
# written under one resumes under another (``postrl.trainers.common.fingerprint`` leaves them out)
EXECUTION_OPTIONS = ("attention_impl", "remat", "decode_attention_impl", "decode_block_impl")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
_FLAG_FIELDS = ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias")
# rope_scaling type -> the keys its inverse frequencies read (``transformer.rope_inv_freq``)
_ROPE_SCALING_KEYS = {"linear": ("factor",), "default": (),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings")}


class ConfigError(ValueError):
  """A model config that postrl cannot build (names the file and the field)."""


def dtype_from_name(name: str | Any):
  """'bfloat16' -> jnp.bfloat16; dtypes pass through."""
  if isinstance(name, str):
    if name not in _DTYPES:
      raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]
  return name


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer hyper-parameters (names follow transformers' config.json)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # a dict is accepted and frozen to sorted (key, value) pairs
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of activations and matmuls
  # How full-sequence attention (no KV cache: training, log-probs, scoring) is computed; a
  # runtime choice like ``dtype``, never written to config.json. "xla": postrl's einsum softmax
  # (every backend; keeps the [T, S] scores of each layer for the backward pass). "cudnn":
  # cuDNN's fused flash attention through ``jax.nn.dot_product_attention`` (NVIDIA GPU, bfloat16
  # / float16 only; no [T, S] scores in memory). "auto" (default): "cudnn" on one NVIDIA GPU
  # (sm80+) in bfloat16 / float16 for shapes cuDNN's flash kernel takes (head dim a multiple of 8
  # up to 128, even sequence length; measured 2.2-2.3x faster SFT / DPO steps on an H200), "xla"
  # elsewhere (``transformer.full_attention_impl``). Cached decoding always uses "xla".
  attention_impl: str = "auto"
  # Activation rematerialisation of each decoder block in full-sequence forwards (training):
  # "none" keeps every intermediate for the backward pass; "full" keeps only each block's input
  # and recomputes the block in the backward pass (~1/3 more FLOPs); "dots" also keeps the
  # outputs of the weight matmuls (jax.checkpoint_policies.dots_with_no_batch_dims_saveable), so
  # only the cheap elementwise work and attention are recomputed. A runtime choice like dtype.
  remat: str = "none"
  # How a cached one-token step attends its KV cache (decoding): "xla", the masked einsum over
  # all P + N slots; "pallas", the flash-decoding Triton kernel ``kernels.decode_attention``,
  # reading only each row's valid slots (one GPU; on a CPU it runs in interpret mode, a test
  # path); "auto" (default), the kernel on one GPU (measured faster at every shape timed on an
  # H100) and XLA elsewhere. A runtime choice like dtype.
  decode_attention_impl: str = "auto"
  # How a cached one-token step of 1 to 16 rows runs each decoder layer: "xla", the layer as
  # written (~12 launches per layer at batch 1); "pallas", ``kernels.decode_block``'s five fused
  # Triton launches (RMSNorm + q / k / v + RoPE + cache write; attention; merge + o + residual;
  # RMSNorm + gate / up + SiLU; down + residual), for float (not quantized, no unmerged adapter)
  # layers without prefix / prompt tuning (on a CPU in interpret mode, a test path; its
  # attention is always the flash-decoding kernel, whatever decode_attention_impl says);
  # "pallas_attention" / "pallas_mlp": that half of the layer fused (launches 1-3 / 4-5), the
  # other half XLA's (pallas_mlp's attention then follows decode_attention_impl);
  # "pallas_persistent": the same five phases in one launch per layer, resident programs waiting
  # at a barrier across the GPU between phases (not yet run on a GPU); "auto"
  # (default): XLA until a GPU run measures the kernels faster
  # (``kernels.decode_block.GPU_MEASURED``, ``GPU_IMPL``). A runtime choice like dtype.
  decode_block_impl: str = "auto"

  def __post_init__(self):
    # Types and ranges first: a bad value fails here, named, not as a shape error inside JAX.
    for name in _POSITIVE_INT_FIELDS:
      _check_positive_int(name, getattr(self, name))
    if self.head_dim is not None:
      _check_positive_int("head_dim", self.head_dim)
    for name in ("rms_norm_eps", "rope_theta"):  # RMSNorm's eps and RoPE's base: finite, > 0
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, numbers.Real)
          or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    for name in _FLAG_FIELDS:
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
    if self.model_type not in SUPPORTED_ARCHITECTURES.values():
      raise ConfigError(f"unsupported model_type {self.model_type!r}; expected one of "
                        f"{sorted(SUPPORTED_ARCHITECTURES.values())}")
    for name in ("bos_token_id", "pad_token_id"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ConfigError(f"{name} must be an integer token id or null, got {value!r}")
    if self.hidden_size % self.num_attention_heads and self.head_dim is None:
      raise ConfigError(
          f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
          f"{self.num_attention_heads}; set head_dim explicitly")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(
          f"num_attention_heads={self.num_attention_heads} must be a multiple of "
          f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
    if self.dim_per_head % 2:
      raise ConfigError(f"head dimension {self.dim_per_head} is odd; RoPE rotates pairs of "
                        f"dimensions, so head_dim (or hidden_size / num_attention_heads) must be even")
    if isinstance(self.rope_scaling, dict):  # frozen so that configs hash (jit static arguments)
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
    if any(e is not None and (isinstance(e, bool) or not isinstance(e, numbers.Integral))
           for e in eos):
      raise ConfigError(f"eos_token_id must be an integer token id, a list of them or null, got "
                        f"{self.eos_token_id!r}")
    if self.rope_scaling is not None:
      try:
        scaling = dict(self.rope_scaling)
      except (TypeError, ValueError):
        raise ConfigError(f"rope_scaling must be a dict such as {{'rope_type': 'linear', "
                          f"'factor': 2.0}}, got {self.rope_scaling!r}") from None
      kind = scaling.get("rope_type", scaling.get("type"))
      if kind not in _ROPE_SCALING_KEYS:
        raise ConfigError(f"unsupported rope_scaling type {kind!r}; postrl supports "
                          "'llama3', 'linear' and 'default'")
      for key in _ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
          raise ConfigError(f"rope_scaling of type {kind!r} needs {key} > 0, got "
                            f"{'nothing' if key not in scaling else repr(value)}")
      if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"rope_scaling of type 'llama3' needs high_freq_factor > "
                          f"low_freq_factor, got {scaling['high_freq_factor']} <= "
                          f"{scaling['low_freq_factor']}")
    for name in ("param_dtype", "dtype"):
      try:
        dtype_from_name(getattr(self, name))
      except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl={self.attention_impl!r}; expected one of "
                        f"{list(ATTENTION_IMPLS)}")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"remat={self.remat!r}; expected one of {list(REMAT_POLICIES)}")
    if self.decode_attention_impl not in DECODE_ATTENTION_IMPLS:
      raise ConfigError(f"decode_attention_impl={self.decode_attention_impl!r}; expected one of "
                        f"{list(DECODE_ATTENTION_IMPLS)}")
    if self.decode_block_impl not in DECODE_BLOCK_IMPLS:
      raise ConfigError(f"decode_block_impl={self.decode_block_impl!r}; expected one of "
                        f"{list(DECODE_BLOCK_IMPLS)}")
    if (self.attention_impl == "cudnn"
        and jnp.dtype(dtype_from_name(self.dtype)) not in (jnp.bfloat16, jnp.float16)):
      raise ConfigError(f"attention_impl='cudnn' needs dtype bfloat16 or float16 (cuDNN's flash "
                        f"attention), got dtype={self.dtype!r}; use attention_impl='xla'")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embeddings counted once when tied)."""
    d, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
    hq, hk, hd = self.num_attention_heads, self.num_key_value_heads, self.dim_per_head
    attn = d * hd * (hq + 2 * hk) + hq * hd * d
    if self.qkv_bias:
      attn += hd * (hq + 2 * hk)
    mlp = 3 * d * f
    per_layer = attn + mlp + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return L * per_layer + emb + d

  # ---------------------------------------------------------------- transformers interop

  @classmethod
  def from_hf(cls, config: str | os.PathLike | dict, **overrides) -> "ModelConfig":
    """Builds a config from a transformers ``config.json`` (a path, a directory or a dict)."""
    source = "<dict>"
    if not isinstance(config, dict):
      path = os.fspath(config)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      source = path
      if not os.path.exists(path):
        raise ConfigError(f"{path}: config.json not found")
      try:
        with open(path) as f:
          config = json.load(f)
      except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
      raise ConfigError(f"{source}: expected a JSON object of config fields, got "
                        f"{type(config).__name__}")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
      raise ConfigError(f"{source}: field 'architectures' must be a list of class names, got "
                        f"{archs!r}")
    model_type = config.get("model_type")
    if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(f"{source}: unsupported architecture {archs[0]!r}; postrl supports "
                        f"{sorted(SUPPORTED_ARCHITECTURES)}")
    if model_type not in ("llama", "qwen2"):
      raise ConfigError(f"{source}: unsupported model_type {model_type!r}; expected 'llama' or 'qwen2'")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
      raise ConfigError(f"{source}: missing field(s) {missing}")
    is_qwen = model_type == "qwen2"
    for key in ("rope_scaling", "rope_parameters"):
      if config.get(key) is not None and not isinstance(config[key], dict):
        raise ConfigError(f"{source}: field {key!r} must be an object (or null), got "
                          f"{config[key]!r}")
    rope_scaling = config.get("rope_scaling")
    rope_theta = config.get("rope_theta")
    # transformers >= 5 folds rope_theta and scaling into rope_parameters.
    rope_params = config.get("rope_parameters")
    if rope_params:
      rope_theta = rope_params.get("rope_theta", rope_theta)
      if rope_params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
      rope_scaling = None
    eos = config.get("eos_token_id")
    rope_theta = 10000.0 if rope_theta is None else rope_theta
    if isinstance(rope_theta, int) and not isinstance(rope_theta, bool):
      rope_theta = float(rope_theta)

    def flag(key):  # bool() would read the string "false" as True
      value = config.get(key)
      if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{source}: field {key!r} must be true or false, got {value!r}")
      return bool(value)

    kv_heads = config.get("num_key_value_heads")
    kwargs = dict(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_attention_heads"] if kv_heads is None else kv_heads,
        head_dim=config.get("head_dim"),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6 if is_qwen else 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=flag("tie_word_embeddings"),
        qkv_bias=True if is_qwen else flag("attention_bias"),
        o_bias=False if is_qwen else flag("attention_bias"),
        mlp_bias=flag("mlp_bias"),
        model_type=model_type,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=config.get("pad_token_id"),
    )
    kwargs.update(overrides)
    try:
      return cls(**kwargs)
    except ConfigError as e:  # a field's range or type: name the file it came from
      raise ConfigError(f"{source}: {e}") from None

  def to_hf(self) -> dict:
    """The transformers ``config.json`` dict for this config."""
    arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.model_type]
    out = dict(
        architectures=[arch],
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.dim_per_head,
        rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta,
        rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings,
        hidden_act="silu",
        bos_token_id=self.bos_token_id,
        eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        pad_token_id=self.pad_token_id,
        torch_dtype=self.param_dtype,
    )
    if self.model_type == "llama":
      out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    return out
