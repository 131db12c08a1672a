"""Weight IO: GGUF files written here (llama.cpp layout), safetensors round trips, clear errors."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from postrl.models import Transformer, WeightsError, load_pretrained, save_pretrained, state_dict
from postrl.models.weights import read_safetensors, write_safetensors
from tests.conftest import tiny_config

gguf = pytest.importorskip("gguf")

_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _llama_cpp_permute(w, n_head):
  """llama.cpp's convert_hf_to_gguf permutation of W_q / W_k rows (for its interleaved RoPE)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, cfg, tensors, qtype=gguf.GGMLQuantizationType.F32):
  """Writes HF-named tensors as a llama.cpp GGUF file (matrices in `qtype`, vectors in F32)."""
  arch = cfg.model_type
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  for name, arr in tensors.items():
    arr = np.asarray(arr, np.float32)
    if name == "model.embed_tokens.weight":
      gname = "token_embd.weight"
    elif name == "model.norm.weight":
      gname = "output_norm.weight"
    elif name == "lm_head.weight":
      gname = "output.weight"
    else:
      _, _, layer, rest = name.split(".", 3)
      gname = f"blk.{layer}.{_HF_TO_GGUF[rest]}"
      if arch == "llama" and rest == "self_attn.q_proj.weight":
        arr = _llama_cpp_permute(arr, cfg.num_attention_heads)
      if arch == "llama" and rest == "self_attn.k_proj.weight":
        arr = _llama_cpp_permute(arr, cfg.num_key_value_heads)
    if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      if qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(gname, arr.astype(np.float16))
      else:
        w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(gname, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def tiny_model():
  return Transformer(tiny_config(), rngs=nnx.Rngs(0))


def _tokens():
  return jnp.asarray(np.random.RandomState(0).randint(0, 101, (2, 24)), jnp.int32)


def test_gguf_f32_roundtrip_exact(tiny_model, tmp_path):
  path = str(tmp_path / "tiny.gguf")
  write_gguf(path, tiny_model.config, state_dict(tiny_model))
  loaded = load_pretrained(path)
  np.testing.assert_allclose(loaded(_tokens()), tiny_model(_tokens()), rtol=1e-5, atol=1e-6)


def test_gguf_qwen2_biases_roundtrip(tmp_path):
  model = Transformer(tiny_config(model_type="qwen2", qkv_bias=True), rngs=nnx.Rngs(1))
  for layer in model.layers:  # non-zero biases so a dropped or misplaced bias shows
    layer.self_attn.q_proj.bias.set_value(jnp.linspace(-1, 1, layer.self_attn.q_proj.bias.shape[0]))
  path = str(tmp_path / "qwen.gguf")
  write_gguf(path, model.config, state_dict(model))
  np.testing.assert_allclose(load_pretrained(path)(_tokens()), model(_tokens()), rtol=1e-5,
                             atol=1e-6)


def test_transformers_reads_our_gguf_layout_the_same_way(tiny_model, tmp_path):
  # An independent check of the RoPE row permutation: transformers undoes llama.cpp's permute on
  # its own, and must see the same model that postrl sees.
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")
  write_gguf(str(tmp_path / "tiny.gguf"), tiny_model.config, state_dict(tiny_model))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                         dtype=torch.float32).eval()
  with torch.no_grad():
    ref = hf(torch.tensor(np.asarray(_tokens()))).logits.numpy()
  out = np.asarray(load_pretrained(str(tmp_path / "tiny.gguf"))(_tokens()))
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4


@pytest.mark.parametrize("qtype, bound", [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2), ("Q4_0", 0.15),
                                          ("Q4_1", 0.15)])
def test_gguf_quantized_types_dequantise_within_bound(tiny_model, tmp_path, qtype, bound):
  path = str(tmp_path / f"tiny-{qtype}.gguf")
  tensors = state_dict(tiny_model)
  write_gguf(path, tiny_model.config, tensors, getattr(gguf.GGMLQuantizationType, qtype))
  loaded = state_dict(load_pretrained(path))
  for name, ref in tensors.items():
    err = np.linalg.norm(loaded[name] - ref) / np.linalg.norm(ref)
    assert err < bound, (qtype, name, err)


def test_safetensors_bfloat16_and_sharded_index(tiny_model, tmp_path):
  out = tmp_path / "bf16"
  save_pretrained(tiny_model, str(out), dtype="bfloat16")
  assert read_safetensors(str(out / "model.safetensors"))["model.norm.weight"].dtype == ml_dtypes.bfloat16
  loaded = load_pretrained(str(out), param_dtype="bfloat16")
  assert loaded.embed_tokens[...].dtype == jnp.bfloat16
  # Split into two shards with an index, as large HF checkpoints are.
  tensors = read_safetensors(str(out / "model.safetensors"))
  names = sorted(tensors)
  shard_dir = tmp_path / "sharded"
  shard_dir.mkdir()
  (shard_dir / "config.json").write_text((out / "config.json").read_text())
  weight_map = {}
  for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
    fname = f"model-0000{i + 1}-of-00002.safetensors"
    write_safetensors(str(shard_dir / fname), {n: tensors[n] for n in part})
    weight_map.update({n: fname for n in part})
  (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  np.testing.assert_array_equal(load_pretrained(str(shard_dir), param_dtype="bfloat16")(_tokens()),
                                loaded(_tokens()))


# ------------------------------------------------------------------------------ bad input


@pytest.fixture()
def saved(tiny_model, tmp_path):
  save_pretrained(tiny_model, str(tmp_path / "m"))
  return tmp_path / "m"


def test_missing_path_is_named(tmp_path):
  with pytest.raises(WeightsError, match="no such file or directory"):
    load_pretrained(str(tmp_path / "nope"))


def test_truncated_safetensors_names_file_and_tensor(saved):
  f = saved / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) - 100])
  with pytest.raises(WeightsError, match=r"model\.safetensors: truncated file: tensor '.*'"):
    load_pretrained(str(saved))


def test_missing_tensor_is_named(saved):
  tensors = read_safetensors(str(saved / "model.safetensors"))
  tensors = {k: np.array(v) for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
  write_safetensors(str(saved / "model.safetensors"), tensors)
  with pytest.raises(WeightsError, match="'model.layers.1.mlp.up_proj.weight' missing"):
    load_pretrained(str(saved))


def test_shape_mismatch_names_tensor_and_shapes(saved):
  config = json.loads((saved / "config.json").read_text())
  config["intermediate_size"] = 128
  (saved / "config.json").write_text(json.dumps(config))
  with pytest.raises(WeightsError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\), "
                                         r"the config needs \(64, 128\)"):
    load_pretrained(str(saved))


def test_unsupported_architecture(saved):
  config = json.loads((saved / "config.json").read_text())
  config["architectures"] = ["MistralForCausalLM"]
  (saved / "config.json").write_text(json.dumps(config))
  with pytest.raises(WeightsError, match="unsupported architecture 'MistralForCausalLM'"):
    load_pretrained(str(saved))


def test_garbage_gguf_and_unsupported_arch(tmp_path):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(WeightsError, match="bad.gguf: not a readable GGUF file"):
    load_pretrained(str(bad))
  w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(WeightsError, match="unsupported GGUF architecture 'gpt2'"):
    load_pretrained(str(tmp_path / "gpt2.gguf"))


def test_save_is_atomic_on_failure(tiny_model, tmp_path, monkeypatch):
  target = tmp_path / "out"
  save_pretrained(tiny_model, str(target))
  before = (target / "model.safetensors").read_bytes()

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr("postrl.models.weights.write_safetensors", boom)
  with pytest.raises(OSError, match="disk full"):
    save_pretrained(tiny_model, str(target))
  assert (target / "model.safetensors").read_bytes() == before  # old checkpoint intact
  assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def test_shipped_model_name_resolves_without_network():
  from postrl.models.weights import resolve_model_path  # pylint: disable=import-outside-toplevel
  path = resolve_model_path("smollm2-135m-instruct")
  assert path.endswith(".gguf") and os.path.getsize(path) > 50e6
