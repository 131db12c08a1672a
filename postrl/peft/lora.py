"""LoRA, DoRA and QLoRA: low-rank adapters on the ``Linear`` layers of a model.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"). A targeted layer
y = x W (+ b), W [K, N] frozen, becomes

    y = x W + (α / r) · dropout(x) A B (+ b),    A [K, r] Kaiming-uniform, B [r, N] = 0

so at initialisation the model is unchanged. The scaling is explicit: ΔW = (α / r) A B.
``merge_lora`` folds ΔW into W (W ← W + (α/r) A B) and ``unmerge_lora`` takes it out again.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"). The weight is split into
a magnitude and a direction, per output column n (the norm runs over the input dim K):

    W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_c,    m [N] trainable, initialised to ‖W‖_c,

so W' = W at initialisation. As in the paper (§4.3) and HF PEFT, ‖W + ΔW‖_c is treated as a
constant in the backward pass (``stop_gradient``), and with dropout the layer computes
(m / ‖W + ΔW‖_c) ⊙ (x W + (α/r) dropout(x) A B), which is x W' without dropout.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): the same adapters
on a base whose kernels are 4-bit NF4 with double-quantized scales
(``postrl.quant.quantize_model(model, "nf4_dq")``): y = x dequant(W_q) + (α/r) x A B. The
quantized storage is not an ``nnx.Param``, so it is neither differentiated nor given optimizer
state. Merging a quantized layer dequantises it first (the merged layer is float).

Adapter arrays are ``AdapterParam`` (a subclass of ``nnx.LoRAParam``, so of ``nnx.Param``):
``nnx.split(model, AdapterParam, ...)`` separates them from the frozen base.
"""

from __future__ import annotations

import math
import numbers
import re

import jax
import jax.numpy as jnp
from flax import nnx

from postrl.models.config import ConfigError
from postrl.models.transformer import Linear


class PEFTError(ConfigError):
  """Bad PEFT settings (a target regex that matches nothing, rank <= 0, unknown method, ...)."""


class AdapterParam(nnx.LoRAParam):
  """A trainable adapter array (LoRA A/B, DoRA magnitude, prompt / prefix embeddings)."""


class DropoutKey(nnx.Variable):
  """uint32 [3]: a PRNG key's data and a train flag (1 = apply dropout). Not trainable; the train
  step writes a fresh key per step (``postrl.peft.set_dropout_keys``); flag 0 = evaluation."""


def _adapter(value, names):
  return AdapterParam(value, sharding_names=names, eager_sharding=False)


def _kernel_names(lin: Linear):
  meta = lin.kernel.get_metadata() if isinstance(lin.kernel, nnx.Variable) else {}
  names = meta.get("out_sharding") or meta.get("sharding_names")
  if names is None:
    names = getattr(lin.kernel, "names", None)
  return tuple(names) if names is not None else (None, None)


def _column_norm(w_KxN):
  """‖w‖_c: the L2 norm of every output column n over the input dim K, [N]."""
  return jnp.sqrt(jnp.sum(jnp.square(w_KxN.astype(jnp.float32)), axis=0))


class LoRA(nnx.Module):
  """The adapter of one ``Linear`` [K, N]: A [K, r], B [r, N], scale α/r; with ``dora`` also the
  magnitude m [N]. Called as ``lora(linear, x)``: the whole layer output (module docstring)."""

  def __init__(self, lin: Linear, *, rank: int, alpha: float, dropout: float, dora: bool,
               key: jax.Array):
    K, N = (int(d) for d in (lin.kernel.shape if lin.quantized else lin.kernel[...].shape))
    names = _kernel_names(lin)
    pdt = lin.kernel[...].dtype if not lin.quantized else jnp.float32
    # Kaiming-uniform with a = sqrt(5) (HF PEFT / torch.nn.Linear default): U(-1/sqrt(K), 1/sqrt(K))
    bound = 1.0 / math.sqrt(K)
    self.a = _adapter(jax.random.uniform(key, (K, rank), jnp.float32, -bound, bound).astype(pdt),
                      (names[0], None))
    self.b = _adapter(jnp.zeros((rank, N), pdt), (None, names[1]))
    self.rank, self.alpha = int(rank), float(alpha)
    self.scale = float(alpha) / float(rank)
    self.dropout = float(dropout)
    self.dora = bool(dora)
    self.merged = False
    self.magnitude = _adapter(_column_norm(lin.dense_kernel()).astype(pdt),
                              (names[1],)) if dora else None
    self.dropout_key = DropoutKey(jnp.zeros((3,), jnp.uint32)) if dropout > 0 else None

  def delta(self):
    """ΔW = (α / r) A B, float32 [K, N]."""
    return self.scale * jnp.dot(self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32))

  def dora_factor(self, w_KxN):
    """m / ‖W + ΔW‖_c [N] (the norm is a constant for the gradient, Liu et al. 2024 §4.3)."""
    norm = jax.lax.stop_gradient(_column_norm(w_KxN.astype(jnp.float32) + self.delta()))
    return self.magnitude[...].astype(jnp.float32) / jnp.maximum(norm, 1e-12)

  def _dropout(self, x):
    if self.dropout_key is None:
      return x
    raw = self.dropout_key[...]
    train = raw[2] > 0
    keep = 1.0 - self.dropout
    bits = jax.random.bernoulli(jax.random.wrap_key_data(raw[:2]), keep, x.shape)
    return jnp.where(train, jnp.where(bits, x / keep, 0).astype(x.dtype), x)

  def __call__(self, lin: Linear, x):
    dt = lin.dtype
    base = lin.kernel.dot(x) if lin.quantized else jnp.dot(x, lin.kernel[...].astype(dt))
    h = jnp.dot(self._dropout(x), self.a[...].astype(dt))
    y = base + self.scale * jnp.dot(h, self.b[...].astype(dt))
    if self.dora:
      y = y * self.dora_factor(lin.dense_kernel(jnp.float32)).astype(dt)
    if lin.bias is not None:
      y = y + lin.bias[...].astype(dt)
    return y


def linear_layers(model: nnx.Module) -> dict[str, Linear]:
  """Every ``Linear`` of ``model`` by dotted path (``"layers.0.self_attn.q_proj"``)."""
  return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
          if isinstance(node, Linear)}


def lora_layers(model: nnx.Module) -> dict[str, Linear]:
  """The ``Linear`` layers that carry a LoRA / DoRA adapter, by dotted path."""
  return {n: lin for n, lin in linear_layers(model).items()
          if getattr(lin, "lora", None) is not None}


def _real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check(rank, alpha, dropout):
  if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
    raise PEFTError(f"config.peft.rank must be a positive integer, got {rank!r}")
  # inf would make the scale inf and the output inf * 0 = NaN already at initialisation (B = 0)
  if not _real(alpha) or not 0 < alpha < math.inf:
    raise PEFTError(f"config.peft.alpha must be a finite number > 0 (the update is scaled by "
                    f"alpha / rank), got {alpha!r}")
  if not _real(dropout) or not 0.0 <= dropout < 1.0:
    raise PEFTError(f"config.peft.dropout must be a number in [0, 1), got {dropout!r}")


def _check_seed(seed):
  """An int seed (``jax.random.key`` fails deep inside JAX on None, strings or floats)."""
  if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
    raise PEFTError(f"config.peft.seed must be an integer, got {seed!r}")


def _targeted(model, targets: str) -> dict[str, Linear]:
  try:
    pattern = re.compile(targets)
  except (re.error, TypeError) as e:
    raise PEFTError(f"config.peft.targets {targets!r} is not a valid regex ({e})") from None
  layers = linear_layers(model)
  chosen = {n: lin for n, lin in layers.items() if pattern.search(n)}
  if not chosen:
    listed = ", ".join(list(layers)[:6]) + (", ..." if len(layers) > 6 else "")
    raise PEFTError(f"config.peft.targets regex '{targets}' matches no Linear layer "
                    f"(layers are named like: {listed or '(none)'})")
  already = [n for n, lin in chosen.items() if getattr(lin, "lora", None) is not None]
  if already:
    raise PEFTError(f"config.peft.targets {targets!r}: layer {already[0]} already has an adapter")
  return chosen


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, targets: str,
               dropout: float = 0.0, seed: int = 0, dora: bool = False) -> nnx.Module:
  """Adds LoRA (or, with ``dora``, DoRA) adapters to every ``Linear`` whose dotted path matches
  ``targets`` (``re.search``), in place; see the module docstring for the formulas.

  Args:
    model: a ``Transformer`` (float or ``postrl.quant``-quantized kernels).
    rank: r > 0. alpha: α > 0; the update is scaled by α / r.
    targets: regex over module paths, e.g. ``r"self_attn\\.(q|v)_proj"``.
    dropout: dropout rate on the adapter's input (training steps only).
    seed: A's initialisation (layer i uses ``fold_in(key(seed), i)``).
  Returns:
    ``model``.
  Raises:
    PEFTError: bad rank / alpha / dropout, an invalid regex, or a regex that matches nothing
      (the message names the regex).
  """
  _check(rank, alpha, dropout)
  _check_seed(seed)
  chosen = _targeted(model, targets)
  key = jax.random.key(seed)
  for i, lin in enumerate(chosen.values()):
    lin.lora = nnx.data(LoRA(lin, rank=rank, alpha=alpha, dropout=dropout, dora=dora,
                             key=jax.random.fold_in(key, i)))
  return model


def apply_dora(model: nnx.Module, **kwargs) -> nnx.Module:
  """DoRA adapters (Liu et al. 2024): ``apply_lora(model, dora=True, ...)``."""
  return apply_lora(model, dora=True, **kwargs)


def apply_qlora(model: nnx.Module, *, quant: str = "nf4_dq", rank: int, alpha: float,
                targets: str, dropout: float = 0.0, seed: int = 0,
                quant_targets: str | None = None) -> nnx.Module:
  """QLoRA (Dettmers et al. 2023): quantizes the block ``Linear`` layers (``quant_targets``,
  default every Linear in the blocks, as the paper does) to ``quant`` (default NF4 with double
  quantization, block 64) and adds LoRA adapters on ``targets``. In place."""
  # pylint: disable-next=import-outside-toplevel
  from postrl.quant import DEFAULT_TARGETS, quantize_model
  _check(rank, alpha, dropout)
  _check_seed(seed)
  _targeted(model, targets)  # a regex that matches nothing fails before the slow quantization
  quantize_model(model, quant, targets=quant_targets or DEFAULT_TARGETS)
  return apply_lora(model, rank=rank, alpha=alpha, targets=targets, dropout=dropout, seed=seed)


def _float_kernel(lin: Linear, w_KxN):
  names = _kernel_names(lin)
  return nnx.Param(w_KxN, sharding_names=names, eager_sharding=False)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel, in place: W ← W + (α/r) A B (LoRA) or
  W ← m ⊙ (W + ΔW) / ‖W + ΔW‖_c (DoRA). The layers then skip the adapter path (same outputs,
  one matmul). A quantized kernel is dequantised first (the merged kernel is float, in the
  adapter's dtype): QLoRA export = dequantise + merge."""
  for lin in lora_layers(model).values():
    ad = lin.lora
    if ad.merged:
      continue
    w = lin.dense_kernel(jnp.float32)
    new = w + ad.delta()
    if ad.dora:
      new = ad.dora_factor(w)[None, :] * new
    dt = ad.a[...].dtype if lin.quantized else lin.kernel[...].dtype
    if lin.quantized:
      lin.kernel = _float_kernel(lin, new.astype(dt))
    else:
      lin.kernel.set_value(new.astype(dt))
    ad.merged = True
  return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
  """Undoes ``merge_lora`` for LoRA adapters, in place: W ← W - (α/r) A B. (A merged quantized
  layer stays float: W = dequant(W_q).) DoRA's merge is not invertible without the column norms
  of W, so a merged DoRA layer raises PEFTError."""
  for name, lin in lora_layers(model).items():
    ad = lin.lora
    if not ad.merged:
      continue
    if ad.dora:
      raise PEFTError(f"unmerge_lora: layer {name} is a merged DoRA layer; its base weight cannot "
                      "be recovered (merge a copy instead: postrl.peft.merged_model)")
    lin.kernel.set_value((lin.kernel[...].astype(jnp.float32) - ad.delta()).astype(
        lin.kernel[...].dtype))
    ad.merged = False
  return model


def strip_lora(model: nnx.Module) -> nnx.Module:
  """Removes every (merged) adapter module, leaving plain ``Linear`` layers. In place."""
  for name, lin in lora_layers(model).items():
    if not lin.lora.merged:
      raise PEFTError(f"strip_lora: layer {name} has an unmerged adapter; merge_lora first")
    del lin.lora
  return model


def dropout_keys(state) -> list:
  """The paths of the ``DropoutKey`` variables of an NNX state, in a fixed order."""
  return [p for p, v in nnx.to_flat_state(state) if isinstance(v, DropoutKey)]
