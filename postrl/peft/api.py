r"""PEFT through the config: apply a method, split trainable from frozen, merge, export, save.

    config.peft = peft.default_config()        # method "none" | "lora" | "qlora" | "dora" |
                                               #        "prompt" | "prefix"
    apply_peft(model, config.peft)             # in place
    graphdef, trainable, frozen = split_trainable(model)
    params = combine(trainable, frozen)        # what nnx.merge(graphdef, params) takes

Only ``trainable`` (the ``AdapterParam`` arrays) is differentiated, carried in the optimizer state
and checkpointed; ``frozen`` (the base weights, quantized storage, dropout keys) is rebuilt from
the model source and fingerprinted (``base_digest``). A module that is new rather than part of
the base (a reward model's or PPO's scalar head) is trained in full next to the adapters with
``split_trainable(model, modules_to_save=r"^head\.")``.

    base_graphdef, to_base = base_view(graphdef, params)
    nnx.merge(base_graphdef, to_base(params))  # the base with the adapters removed: the
                                               # reference model of DPO / GRPO / PPO under PEFT
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from postrl.peft import lora
from postrl.peft.lora import (AdapterParam, DropoutKey, PEFTError, apply_dora, apply_lora,
                              apply_qlora, linear_layers, lora_layers, merge_lora,
                              strip_lora)
from postrl.peft.prompt import apply_prefix_tuning, apply_prompt_tuning

METHODS = ("none", "lora", "qlora", "dora", "prompt", "prefix")
DEFAULT_TARGETS = r"self_attn\.(q|v)_proj"
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


def default_config() -> ml_collections.ConfigDict:
  """``config.peft`` with every key (method "none": full fine-tuning)."""
  return ml_collections.ConfigDict(dict(
      method="none", rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, quant="nf4_dq",
      num_virtual_tokens=16, seed=0))


def _get(cfg, key):
  defaults = default_config()
  return cfg.get(key, defaults[key]) if cfg is not None else defaults[key]


def enabled(peft_cfg) -> bool:
  """Whether ``peft_cfg`` asks for a PEFT method (after checking it names a known one)."""
  method = _get(peft_cfg, "method")
  if method not in METHODS:
    raise PEFTError(f"config.peft.method: unknown method {method!r}; known: {', '.join(METHODS)}")
  return method != "none"


def check_config(peft_cfg) -> None:
  """Cheap checks of ``config.peft`` before any model is loaded (PEFTError naming the key)."""
  if not enabled(peft_cfg):
    return
  method = _get(peft_cfg, "method")
  unknown = sorted(set(peft_cfg.keys()) - set(default_config().keys()))
  if unknown:
    raise PEFTError(f"config.peft: unknown key(s) {unknown}; known: {sorted(default_config())}")
  lora._check_seed(_get(peft_cfg, "seed"))
  if method in ("prompt", "prefix"):
    n = _get(peft_cfg, "num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
      raise PEFTError(f"config.peft.num_virtual_tokens must be a positive integer, got {n!r}")
    return
  lora._check(*(_get(peft_cfg, k) for k in ("rank", "alpha", "dropout")))
  if method == "qlora":
    from postrl.quant import parse_spec  # pylint: disable=import-outside-toplevel
    parse_spec(_get(peft_cfg, "quant"))


def apply_peft(model, peft_cfg):
  """Applies ``peft_cfg.method`` to ``model`` in place and returns it (see ``default_config``)."""
  check_config(peft_cfg)
  method = _get(peft_cfg, "method")
  seed = _get(peft_cfg, "seed")
  if method == "none":
    return model
  if method in ("prompt", "prefix"):
    fn = apply_prompt_tuning if method == "prompt" else apply_prefix_tuning
    return fn(model, num_virtual_tokens=_get(peft_cfg, "num_virtual_tokens"), seed=seed)
  kwargs = dict(rank=_get(peft_cfg, "rank"), alpha=float(_get(peft_cfg, "alpha")),
                targets=_get(peft_cfg, "targets"), dropout=float(_get(peft_cfg, "dropout")),
                seed=seed)
  if method == "qlora":
    return apply_qlora(model, quant=_get(peft_cfg, "quant"), **kwargs)
  return (apply_dora if method == "dora" else apply_lora)(model, **kwargs)


# ------------------------------------------------------------------------ trainable / frozen


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


def split_trainable(model, modules_to_save: str | None = None):
  """(graphdef, trainable, frozen): the ``AdapterParam`` arrays, and everything else.

  ``modules_to_save``: a regex (``re.search`` over dotted paths, e.g. ``r"^head\."``) of
  ``nnx.Param`` arrays that are trained in full next to the adapters: modules that are new and
  not part of the pretrained base, such as a reward model's scalar head or PPO's value head (HF
  PEFT's ``modules_to_save``). They join ``trainable`` (gradients, optimizer state,
  checkpoints); PEFTError if the regex matches no parameter."""
  if modules_to_save is None:
    return nnx.split(model, AdapterParam, ...)
  try:
    pattern = re.compile(modules_to_save)
  except (re.error, TypeError) as e:
    raise PEFTError(f"modules_to_save {modules_to_save!r} is not a valid regex ({e})") from None
  saved = lambda path, var: (isinstance(var, nnx.Param) and not isinstance(var, AdapterParam)
                             and pattern.search(_dotted(path)) is not None)
  graphdef, trainable, frozen = nnx.split(model, nnx.Any(AdapterParam, saved), ...)
  if not any(saved(p, v) for p, v in nnx.to_flat_state(trainable)):
    raise PEFTError(f"modules_to_save regex '{modules_to_save}' matches no parameter")
  return graphdef, trainable, frozen


def remove_adapters(model):
  """Deletes every adapter of ``model`` in place (unmerged LoRA / DoRA modules, the prompt, the
  prefixes) and returns it: the frozen base the adapters were added to (for QLoRA the quantized
  base). This is the "adapters disabled" model, e.g. the reference policy of DPO / PPO / GRPO
  when only adapters are trained (as TRL does for PEFT models)."""
  for name, lin in lora_layers(model).items():
    if lin.lora.merged:
      raise PEFTError(f"remove_adapters: layer {name} has a merged adapter; its base weight is "
                      "gone (unmerge_lora first)")
    del lin.lora
  if getattr(model, "prompt", None) is not None:
    del model.prompt
  for layer in getattr(model, "layers", ()):
    if getattr(layer.self_attn, "prefix", None) is not None:
      del layer.self_attn.prefix
  return model


def base_view(graphdef, state):
  """(base_graphdef, to_base): the model ``nnx.merge(graphdef, state)`` without its adapters
  (``remove_adapters``), as a graphdef, and ``to_base(full_state) -> base_state``, which keeps
  the base's entries of a full state of the same model (``combine(trainable, frozen)``): the
  same arrays, no copy, usable inside ``jit``. ``state`` may be host, device or abstract
  (``jax.ShapeDtypeStruct``) arrays."""
  base_graphdef, base_state = nnx.split(remove_adapters(nnx.merge(graphdef, state)))
  keep = {tuple(path) for path, _ in nnx.to_flat_state(base_state)}

  def to_base(full_state):
    return nnx.from_flat_state([(path, var) for path, var in nnx.to_flat_state(full_state)
                                if tuple(path) in keep])

  return base_graphdef, to_base


def set_dropout_keys(state, rng):
  """``state`` with every ``DropoutKey`` set to its own key ``fold_in(rng, i)`` and the train
  flag on (adapter dropout active)."""
  flat = nnx.to_flat_state(state)
  out, i = [], 0
  for path, var in flat:
    if isinstance(var, DropoutKey):
      data = jax.random.key_data(jax.random.fold_in(rng, i)).astype(jnp.uint32).reshape(-1)[:2]
      var = var.replace(jnp.concatenate([data, jnp.ones((1,), jnp.uint32)]))
      i += 1
    out.append((path, var))
  return nnx.from_flat_state(out)


def combine(trainable, frozen, rng=None):
  """The full parameter state ``nnx.merge(graphdef, ...)`` takes; with ``rng`` (a training step)
  the adapters' dropout keys are drawn from it."""
  state = nnx.merge_state(trainable, frozen)
  return state if rng is None else set_dropout_keys(state, rng)


def num_elements(state) -> int:
  """Number of array elements of a state / pytree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state) if hasattr(x, "shape")))


def base_digest(frozen) -> str:
  """BLAKE2b of the frozen state (paths, dtypes, shapes, bytes): what an adapter-only checkpoint
  must be resumed against (the base is rebuilt from the model source, not checkpointed)."""
  h = hashlib.blake2b(digest_size=16)
  for path, var in nnx.to_flat_state(frozen):
    if isinstance(var, DropoutKey):  # overwritten every step
      continue
    arr = np.asarray(jax.device_get(var.get_value()))
    h.update(repr((tuple(str(p) for p in path), arr.dtype.str, arr.shape)).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


# ------------------------------------------------------------------------ export


def has_prompt_or_prefix(model) -> bool:
  return getattr(model, "prompt", None) is not None or any(
      getattr(layer.self_attn, "prefix", None) is not None for layer in model.layers)


def merged_model(model, *, copy: bool = True):
  """A plain model with every LoRA / DoRA adapter folded into its kernel (``merge_lora``), the
  adapters removed and any remaining quantized kernel dequantised: what ``save_pretrained``
  writes and transformers loads. Prompt / prefix adapters cannot be folded into weights
  (PEFTError; save them with ``save_adapters``)."""
  from postrl.quant import dequantize_model  # pylint: disable=import-outside-toplevel
  if has_prompt_or_prefix(model):
    raise PEFTError("prompt / prefix tuning adds virtual tokens that no weight of the base "
                    "architecture can hold: export the adapters (save_adapters), not a merged "
                    "model")
  if copy:
    model = nnx.clone(model)
  strip_lora(merge_lora(model))
  return dequantize_model(model)


def adapter_tensors(model_or_state) -> dict[str, np.ndarray]:
  """Adapter arrays by dotted path (``layers.0.self_attn.q_proj.lora.a``), as numpy."""
  state = (nnx.state(model_or_state, AdapterParam) if isinstance(model_or_state, nnx.Module)
           else model_or_state)
  return {".".join(str(p) for p in path): np.asarray(jax.device_get(var.get_value()))
          for path, var in nnx.to_flat_state(state)}


def _check_describes(model, cfg: dict) -> None:
  """PEFTError unless ``cfg`` (what ``load_adapters`` applies) rebuilds the adapters of ``model``.
  alpha is in no tensor: a wrong one would load without error and scale every update wrongly."""
  method = cfg["method"]
  layers = lora_layers(model)
  prompt = getattr(model, "prompt", None)
  prefixes = [layer.self_attn.prefix for layer in getattr(model, "layers", ())
              if getattr(layer.self_attn, "prefix", None) is not None]
  kinds = ((["DoRA" if any(lin.lora.dora for lin in layers.values()) else "LoRA"] if layers
            else []) + (["prompt"] if prompt is not None else [])
           + (["prefix"] if prefixes else []))
  want = dict(lora="LoRA", qlora="LoRA", dora="DoRA", prompt="prompt", prefix="prefix").get(method)
  if kinds != ([want] if want else []):
    raise PEFTError(f"save_adapters: the model has {' + '.join(kinds) or 'no'} adapters but "
                    f"config.peft.method={method!r}: the saved config would not rebuild them")
  if want in ("prompt", "prefix"):
    n = (prompt or prefixes[0]).num_virtual_tokens
    if n != cfg["num_virtual_tokens"]:
      raise PEFTError(f"save_adapters: the model has {n} virtual tokens but "
                      f"config.peft.num_virtual_tokens={cfg['num_virtual_tokens']!r}")
  elif want:
    for name, lin in layers.items():
      ad = lin.lora
      if (ad.rank != cfg["rank"] or ad.dora != (method == "dora")
          or not math.isclose(ad.alpha, float(cfg["alpha"]))):
        raise PEFTError(f"save_adapters: layer {name} has a {'DoRA' if ad.dora else 'LoRA'} "
                        f"adapter of rank {ad.rank} and alpha {ad.alpha}, but config.peft has "
                        f"method={method!r}, rank={cfg['rank']!r}, alpha={cfg['alpha']!r}")
    targets = cfg["targets"]
    try:
      targeted = {n for n in linear_layers(model) if re.search(targets, n)}
    except (re.error, TypeError) as e:
      raise PEFTError(f"config.peft.targets {targets!r} is not a valid regex ({e})") from None
    extra, missing = sorted(set(layers) - targeted), sorted(targeted - set(layers))
    if extra:
      raise PEFTError(f"save_adapters: layer {extra[0]} has an adapter but config.peft.targets "
                      f"{targets!r} does not match it")
    if missing:
      raise PEFTError(f"save_adapters: layer {missing[0]} matches config.peft.targets "
                      f"{targets!r} but has no adapter")


def save_adapters(model_or_state, directory: str, peft_cfg) -> None:
  """Writes ``adapter.safetensors`` (adapter arrays in postrl's [in, out] layout: A [K, r],
  B [r, N], ΔW = (alpha / rank) A B) and ``adapter_config.json`` (the method and its settings).
  Given a model, PEFTError if ``peft_cfg`` does not describe its adapters (method, rank, alpha,
  targets, virtual tokens): ``load_adapters`` rebuilds them from it."""
  from postrl.models.weights import write_safetensors  # pylint: disable=import-outside-toplevel
  cfg = (peft_cfg.to_dict() if hasattr(peft_cfg, "to_dict") else dict(peft_cfg))
  cfg = dict(default_config().to_dict(), **cfg)
  if isinstance(model_or_state, nnx.Module):
    _check_describes(model_or_state, cfg)
  os.makedirs(directory, exist_ok=True)
  cfg["layout"] = ("postrl [in, out]: lora.a [K, r], lora.b [r, N], delta W = alpha / rank * "
                   "a @ b; dora: lora.magnitude [N]; prompt.embeddings [P, D]; "
                   "self_attn.prefix.k / .v [P, Hkv, Dh]")
  write_safetensors(os.path.join(directory, ADAPTER_FILE), adapter_tensors(model_or_state))
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(cfg, f, indent=1)


def load_adapters(model, directory: str):
  """Applies the method of ``directory/adapter_config.json`` to ``model`` (a base model, in
  place) and loads the saved adapter arrays into it. Returns the model. On a PEFTError (a bad
  config, a missing, extra or misshapen tensor) the model is left without the new adapters."""
  from postrl.models.weights import read_safetensors  # pylint: disable=import-outside-toplevel
  path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.exists(path):
    raise PEFTError(f"{path}: no adapter config (expected {ADAPTER_CONFIG} beside "
                    f"{ADAPTER_FILE})")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PEFTError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise PEFTError(f"{path}: expected a JSON object of PEFT settings, got "
                    f"{type(cfg).__name__}")
  cfg.pop("layout", None)
  # read (and fail on) the arrays before the model is changed in place
  tensors = read_safetensors(os.path.join(directory, ADAPTER_FILE))
  cfg = ml_collections.ConfigDict(cfg)
  if cfg.get("method") == "qlora":
    # quantizing the base cannot be undone: check names and shapes on LoRA adapters first (the
    # same A and B shapes), then remove them and quantize
    _, undo = _attach(model, ml_collections.ConfigDict(dict(cfg.to_dict(), method="lora")),
                      tensors, path, directory)
    undo()
  flat, _ = _attach(model, cfg, tensors, path, directory)
  for (_, var), name in zip(flat, _names(flat)):
    var.set_value(jnp.asarray(tensors[name], var.get_value().dtype))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def _names(flat) -> list[str]:
  return [".".join(str(x) for x in p) for p, _ in flat]


def _undo_new_adapters(model):
  """A function that deletes the adapters added to ``model`` after this call."""
  lora_before = set(lora_layers(model))
  had_prompt = getattr(model, "prompt", None) is not None
  layers = list(getattr(model, "layers", ()))
  prefix_before = [getattr(layer.self_attn, "prefix", None) is not None for layer in layers]

  def undo():
    for name, lin in lora_layers(model).items():
      if name not in lora_before:
        del lin.lora
    if not had_prompt and getattr(model, "prompt", None) is not None:
      del model.prompt
    for layer, had in zip(layers, prefix_before):
      if not had and getattr(layer.self_attn, "prefix", None) is not None:
        del layer.self_attn.prefix

  return undo


def _attach(model, cfg, tensors, path, directory):
  """Applies ``cfg`` and checks that ``tensors`` fit the adapters exactly -> (their flat state,
  undo). On a mismatch the new adapters are removed again before the PEFTError (a failed load
  leaves the model as it was, so that the right folder can be loaded next)."""
  undo = _undo_new_adapters(model)
  try:
    apply_peft(model, cfg)
  except PEFTError as e:
    undo()
    raise PEFTError(f"{path}: {e}") from None
  try:
    flat = nnx.to_flat_state(nnx.state(model, AdapterParam))
    _check_tensors(flat, tensors, directory)
  except PEFTError:
    undo()
    raise
  return flat, undo


def _check_tensors(flat, tensors, directory) -> None:
  names = _names(flat)
  for name, (_, var) in zip(names, flat):
    if name not in tensors:
      raise PEFTError(f"{directory}/{ADAPTER_FILE}: adapter tensor {name!r} missing")
    if tuple(tensors[name].shape) != tuple(var.get_value().shape):
      raise PEFTError(f"{directory}/{ADAPTER_FILE}: tensor {name!r} has shape "
                      f"{list(tensors[name].shape)}, the model needs {list(var.get_value().shape)}")
  unused = sorted(set(tensors) - set(names))
  if unused:  # e.g. adapters of layers this model does not have: they would be dropped silently
    raise PEFTError(f"{directory}/{ADAPTER_FILE}: tensor {unused[0]!r} has no place in the model "
                    f"({len(unused)} such tensors; saved from a model with other layers?)")


__all__ = ["METHODS", "DEFAULT_TARGETS", "default_config", "enabled", "check_config", "apply_peft",
           "split_trainable", "remove_adapters", "base_view", "set_dropout_keys", "combine",
           "num_elements", "base_digest", "merged_model", "adapter_tensors", "save_adapters",
           "load_adapters", "lora_layers"]
