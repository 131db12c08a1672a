"""Bad model input is one clear error naming the file and the field or tensor: config ranges and
types, corrupt safetensors headers and indexes, weights the config does not describe, GGUF
metadata, export targets, tokenizer configs, and the generate CLI."""

import json
import os
import struct

import numpy as np
import pytest
from flax import nnx

from postrl import generate as generate_cli
from postrl.models import (ConfigError, ModelConfig, TokenizerError, Transformer, WeightsError,
                           load_pretrained, load_tokenizer, save_pretrained, save_tokenizer,
                           state_dict)
from postrl.models.weights import read_hf_tensors, read_safetensors, write_safetensors
from tests.conftest import tiny_config

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_model():
  return Transformer(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture()
def saved(tiny_model, tmp_path):
  save_pretrained(tiny_model, str(tmp_path / "m"))
  return tmp_path / "m"


def _edit_config(directory, **fields):
  config = json.loads((directory / "config.json").read_text())
  config.update(fields)
  (directory / "config.json").write_text(json.dumps(config))


def _edit_tensors(directory, fn):
  path = str(directory / "model.safetensors")
  tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
  fn(tensors)
  write_safetensors(path, tensors)


# ------------------------------------------------------------------------------ ModelConfig


@pytest.mark.parametrize("fields, message", [
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"vocab_size": -5}, "vocab_size must be a positive integer, got -5"),
    ({"hidden_size": 64.0}, "hidden_size must be a positive integer, got 64.0"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"rope_theta": 0.0}, "rope_theta must be a finite number > 0, got 0.0"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps must be a finite number > 0, got 0.0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number > 0, got nan"),
    ({"head_dim": 7}, "head dimension 7 is odd"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling of type 'llama3' needs low_freq_factor > 0, got nothing"),
    ({"rope_scaling": "linear"}, "rope_scaling must be a dict"),
    ({"model_type": "mistral"}, "unsupported model_type 'mistral'"),
    ({"eos_token_id": "2"}, "eos_token_id must be an integer token id"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false, got 'no'"),
    ({"param_dtype": "float64"}, "param_dtype: unknown dtype 'float64'"),
])
def test_config_fields_out_of_range_are_named(fields, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    tiny_config(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"num_attention_heads": "4"}, "num_attention_heads must be a positive integer, got '4'"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"num_attention_heads": 5, "head_dim": None}, "hidden_size=64 is not divisible"),
    ({"tie_word_embeddings": "false"}, "field 'tie_word_embeddings' must be true or false"),
    ({"architectures": "LlamaForCausalLM"}, "field 'architectures' must be a list"),
    ({"rope_scaling": "linear"}, "field 'rope_scaling' must be an object"),
    ({"rope_theta": "abc"}, "rope_theta must be a finite number > 0, got 'abc'"),
])
def test_config_json_bad_field_names_file_and_field(tmp_path, fields, message):
  config = tiny_config().to_hf()
  config.update(fields)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=r"config\.json: .*" + message.replace("(", r"\(")):
    ModelConfig.from_hf(str(tmp_path))


def test_config_json_that_is_not_an_object(tmp_path):
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object"):
    ModelConfig.from_hf(str(tmp_path))


# ------------------------------------------------------------------------------ safetensors


def _rewrite_header(path, fn):
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  header = fn(header)
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _set(name, key, value):
  def fn(header):
    if key is None:
      header[name] = value
    elif value is None:
      header[name].pop(key)
    else:
      header[name][key] = value
    return header
  return fn


@pytest.mark.parametrize("mutate, problem", [
    (_set("a", None, [1, 2]), "an entry"),
    (_set("a", "dtype", None), "dtype"),
    (_set("a", "shape", "abc"), "shape"),
    (_set("a", "data_offsets", None), "data_offsets"),
    (_set("a", "data_offsets", [-16, 0]), "data_offsets"),
    (lambda header: [1, 2, 3], None),
])
def test_corrupt_safetensors_header_names_file_and_tensor(tmp_path, mutate, problem):
  path = tmp_path / "x.safetensors"
  write_safetensors(str(path), {"a": np.ones((4,), np.float32), "b": np.zeros((2, 2), np.float32)})
  _rewrite_header(path, mutate)
  expected = (r"x\.safetensors: corrupt safetensors header" +
              (f": tensor 'a' has {problem}" if problem else r" \(a JSON list"))
  with pytest.raises(WeightsError, match=expected):
    read_safetensors(str(path))


def test_bad_shard_index_is_named(saved):
  (saved / "model.safetensors").rename(saved / "shard-1.safetensors")
  index = saved / "model.safetensors.index.json"
  index.write_text("{not json")
  with pytest.raises(WeightsError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
    read_hf_tensors(str(saved))
  index.write_text(json.dumps({"metadata": {}}))
  with pytest.raises(WeightsError, match=r"index\.json: no 'weight_map'"):
    load_pretrained(str(saved))


# ------------------------------------------------------------------------------ weights vs config


def test_tensor_of_a_layer_the_config_lacks_is_refused(saved):
  """A config with too few layers (or no biases) must not silently drop the rest."""
  _edit_tensors(saved, lambda t: t.update({
      "model.layers.2.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
  with pytest.raises(WeightsError, match="'model.layers.2.mlp.up_proj.weight' not used by the config"):
    load_pretrained(str(saved))


def test_bias_the_config_lacks_is_refused(saved):
  _edit_tensors(saved, lambda t: t.update({
      "model.layers.0.self_attn.q_proj.bias": np.ones((64,), np.float32)}))
  with pytest.raises(WeightsError, match=r"'model.layers.0.self_attn.q_proj.bias' not used .*"
                                         r"qkv_bias=False"):
    load_pretrained(str(saved))


def test_tied_config_with_a_different_lm_head_is_refused(saved):
  _edit_config(saved, tie_word_embeddings=True)  # the saved model is untied: lm_head != embed
  with pytest.raises(WeightsError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
    load_pretrained(str(saved))


def test_tied_config_with_an_equal_lm_head_loads(saved):
  _edit_config(saved, tie_word_embeddings=True)
  _edit_tensors(saved, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  _edit_tensors(saved, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq":
                                           np.ones((8,), np.float32)}))
  assert load_pretrained(str(saved)).config.tie_word_embeddings
  # tensors outside the decoder are another loader's (a reward model's score head)
  _edit_tensors(saved, lambda t: t.update({"score.weight": np.ones((1, 64), np.float32)}))
  load_pretrained(str(saved))


def test_integer_tensor_is_not_cast_into_a_weight(saved):
  _edit_tensors(saved, lambda t: t.update({"model.norm.weight": np.ones((64,), np.int32)}))
  with pytest.raises(WeightsError, match="'model.norm.weight' has dtype int32, not a floating"):
    load_pretrained(str(saved))


# ------------------------------------------------------------------------------ GGUF


def _write_gguf(path, metadata, tensors):
  w = gguf.GGUFWriter(str(path), "llama")
  for key, value in metadata.items():
    if isinstance(value, float):
      w.add_float32(f"llama.{key}", value)
    else:
      w.add_uint32(f"llama.{key}", value)
  for name, arr in tensors.items():
    w.add_tensor(name, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


_META = {"block_count": 1, "context_length": 64, "embedding_length": 16,
         "feed_forward_length": 32, "attention.head_count": 2, "attention.head_count_kv": 2,
         "vocab_size": 8}


def _gguf_tensors(q_rows=16):
  r = np.random.RandomState(0)
  t = {"token_embd.weight": r.randn(8, 16), "output_norm.weight": np.ones(16),
       "blk.0.attn_norm.weight": np.ones(16), "blk.0.ffn_norm.weight": np.ones(16),
       "blk.0.attn_q.weight": r.randn(q_rows, 16), "blk.0.attn_k.weight": r.randn(16, 16),
       "blk.0.attn_v.weight": r.randn(16, 16), "blk.0.attn_output.weight": r.randn(16, 16),
       "blk.0.ffn_gate.weight": r.randn(32, 16), "blk.0.ffn_up.weight": r.randn(32, 16),
       "blk.0.ffn_down.weight": r.randn(16, 32)}
  return {k: v.astype(np.float32) for k, v in t.items()}


def test_gguf_tiny_file_loads(tmp_path):
  _write_gguf(tmp_path / "m.gguf", _META, _gguf_tensors())
  assert load_pretrained(str(tmp_path / "m.gguf")).config.num_hidden_layers == 1


@pytest.mark.parametrize("key, value, message", [
    ("embedding_length", None, "llama.embedding_length missing"),
    ("block_count", None, "llama.block_count missing"),
    ("attention.head_count", 0, "llama.attention.head_count must be one positive integer, got 0"),
])
def test_gguf_bad_metadata_names_file_and_key(tmp_path, key, value, message):
  meta = dict(_META)
  if value is None:
    del meta[key]
  else:
    meta[key] = value
  _write_gguf(tmp_path / "m.gguf", meta, _gguf_tensors())
  with pytest.raises(WeightsError, match=r"m\.gguf: GGUF metadata " + message):
    load_pretrained(str(tmp_path / "m.gguf"))


def test_gguf_attention_matrix_of_the_wrong_size_names_the_tensor(tmp_path):
  _write_gguf(tmp_path / "m.gguf", _META, _gguf_tensors(q_rows=14))  # rows not 2 heads x 8
  with pytest.raises(WeightsError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape "
                                         r"\(14, 16\), the config needs \(16, 16\)"):
    load_pretrained(str(tmp_path / "m.gguf"))


def test_gguf_extra_block_is_refused(tmp_path):
  tensors = _gguf_tensors()
  tensors["blk.1.ffn_up.weight"] = tensors["blk.0.ffn_up.weight"]
  _write_gguf(tmp_path / "m.gguf", _META, tensors)
  with pytest.raises(WeightsError, match="'model.layers.1.mlp.up_proj.weight' not used"):
    load_pretrained(str(tmp_path / "m.gguf"))


# ------------------------------------------------------------------------------ export


def test_save_onto_a_file_is_refused_and_keeps_it(tiny_model, tmp_path):
  target = tmp_path / "notes.txt"
  target.write_text("keep me")
  with pytest.raises(WeightsError, match="notes.txt: exists and is not a directory"):
    save_pretrained(tiny_model, str(target))
  assert target.read_text() == "keep me"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no temporary left
  with pytest.raises(WeightsError, match="a parent of this path is a file"):
    save_pretrained(tiny_model, str(target / "model"))


def test_save_into_a_non_model_directory_does_not_delete_it(tiny_model, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "results.json").write_text("{}")
  with pytest.raises(WeightsError, match="not a model folder"):
    save_pretrained(tiny_model, str(workdir))
  assert [p.name for p in workdir.iterdir()] == ["results.json"]
  save_pretrained(tiny_model, str(tmp_path / "empty_dir_ok"))
  save_pretrained(tiny_model, str(tmp_path / "empty_dir_ok"))  # a model folder is replaced
  assert state_dict(load_pretrained(str(tmp_path / "empty_dir_ok"))).keys() == \
      state_dict(tiny_model).keys()


def test_replacing_a_model_keeps_the_old_one_if_the_new_cannot_be_moved_in(tiny_model, tmp_path,
                                                                             monkeypatch):
  """The old folder is moved aside, not deleted, until the new one is in place: a failure of
  the rename that puts the new folder in place leaves the old model where it was, loadable."""
  target = tmp_path / "model"
  save_pretrained(tiny_model, str(target))
  before = (target / "model.safetensors").read_bytes()
  real_rename, real_replace = os.rename, os.replace
  moved_out = set()  # where the old folder went: moving it back in must work

  def failing(real):
    def move(src, dst, *a, **k):
      if str(src) == str(target):
        moved_out.add(str(dst))
      elif str(dst) == str(target) and str(src) not in moved_out:  # the new folder moving in
        raise OSError("rename failed")
      return real(src, dst, *a, **k)
    return move

  monkeypatch.setattr(os, "rename", failing(real_rename))
  monkeypatch.setattr(os, "replace", failing(real_replace))
  other = Transformer(tiny_config(), rngs=nnx.Rngs(1))
  with pytest.raises(OSError, match="rename failed"):
    save_pretrained(other, str(target))
  monkeypatch.undo()
  assert (target / "model.safetensors").read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or backup left
  assert state_dict(load_pretrained(str(target))).keys() == state_dict(tiny_model).keys()
  save_pretrained(other, str(target))  # and a save that succeeds leaves no backup either
  assert [p.name for p in tmp_path.iterdir()] == ["model"]
  assert (target / "model.safetensors").read_bytes() != before


# ------------------------------------------------------------------------------ tokenizers


def _word_tokenizer_dir(directory, n_words):
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, n_words)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(str(directory / "tokenizer.json"))


def test_bad_tokenizer_config_names_the_file(tmp_path):
  _word_tokenizer_dir(tmp_path, 10)
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not a valid tokenizer_config"):
    load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text("[1]")
  with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: .*a JSON list"):
    load_tokenizer(str(tmp_path))


def _tokenizer_config(directory, **fields):
  (directory / "tokenizer_config.json").write_text(json.dumps(fields))


@pytest.mark.parametrize("key", ["bos_token", "eos_token", "pad_token"])
def test_special_token_missing_from_the_vocabulary_is_named(tmp_path, key):
  """A special token the config names but the vocabulary lacks was silently None (no BOS added,
  no EOS to stop on); an absent or null field is None."""
  _word_tokenizer_dir(tmp_path, 10)
  _tokenizer_config(tmp_path, **{key: "w3"})
  assert getattr(load_tokenizer(str(tmp_path)), key.replace("_token", "_id")) == 3
  _tokenizer_config(tmp_path, **{key: None})
  assert getattr(load_tokenizer(str(tmp_path)), key.replace("_token", "_id")) is None
  for value in ("<s>", {"content": "<s>", "special": True}):
    _tokenizer_config(tmp_path, **{key: value})
    with pytest.raises(TokenizerError, match=rf"tokenizer_config\.json: {key} '<s>' is not in the "
                                             r"vocabulary of .*tokenizer\.json"):
      load_tokenizer(str(tmp_path))
  _tokenizer_config(tmp_path, **{key: 5})
  with pytest.raises(TokenizerError, match=rf"tokenizer_config\.json: {key} must be a token "
                                           r"string .*, got 5"):
    load_tokenizer(str(tmp_path))


def test_add_bos_token_must_be_a_bool(tmp_path):
  _word_tokenizer_dir(tmp_path, 10)
  _tokenizer_config(tmp_path, add_bos_token="false")  # bool("false") is True
  with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: add_bos_token must be true or "
                                           r"false, got 'false'"):
    load_tokenizer(str(tmp_path))


def test_bad_jinja_chat_template_is_named_at_load(tmp_path):
  """A template that does not compile failed at the first render, naming no file."""
  _word_tokenizer_dir(tmp_path, 10)
  _tokenizer_config(tmp_path, chat_template="{% for m in messages %}{{ m.content }")
  with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template: not a valid "
                                           r"Jinja template \(line 1: unexpected '}'\)"):
    load_tokenizer(str(tmp_path))
  for bad in (["{{ x }}"], [{"name": "default"}]):  # a default without its template: not ChatML
    _tokenizer_config(tmp_path, chat_template=bad)
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template: must be a "
                                             r"Jinja string or a list of"):
      load_tokenizer(str(tmp_path))
  _tokenizer_config(tmp_path, chat_template=7)
  with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template: must be a "
                                           r"Jinja string .*got int"):
    load_tokenizer(str(tmp_path))


def test_named_chat_templates_without_a_default_are_refused(tmp_path):
  """transformers refuses to pick among named templates with no 'default'; postrl silently fell
  back to ChatML."""
  _word_tokenizer_dir(tmp_path, 10)
  _tokenizer_config(tmp_path, chat_template=[{"name": "tool_use", "template": "{{ 1 }}"}])
  with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template: named "
                                           r"templates \['tool_use'\] and none is 'default'"):
    load_tokenizer(str(tmp_path))
  _tokenizer_config(tmp_path, chat_template=[{"name": "tool_use", "template": "{{ 1 }}"},
                                             {"name": "default", "template": "{{ 2 }}"}])
  assert load_tokenizer(str(tmp_path)).chat_template == "{{ 2 }}"


def test_chat_template_jinja_file_is_read_first(tmp_path):
  """Recent transformers save the template as chat_template.jinja, not in tokenizer_config.json
  (and read it first): it was ignored, and ChatML silently used instead."""
  _word_tokenizer_dir(tmp_path, 10)
  _tokenizer_config(tmp_path, chat_template="{{ 'old' }}")
  (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
  tok = load_tokenizer(str(tmp_path))
  assert tok.chat_template == "{{ bos_token }}{{ messages[0]['content'] }}"
  save_tokenizer(tok, str(tmp_path))  # the saved template is the one loaded back
  tok.chat_template = "{{ 'new' }}"
  save_tokenizer(tok, str(tmp_path))
  assert load_tokenizer(str(tmp_path)).chat_template == "{{ 'new' }}"
  (tmp_path / "chat_template.jinja").write_text("{% if %}")
  with pytest.raises(TokenizerError, match=r"chat_template\.jinja: not a valid Jinja template "
                                           r"\(line 1: Expected an expression"):
    load_tokenizer(str(tmp_path))


def _write_gguf_tokenizer(path, *, tokens=("a", "b", "ab", "<s>"), merges=("a b",), types=None,
                          bos=None, template=None):
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model("gpt2")
  if tokens is not None:
    w.add_token_list(list(tokens))
  w.add_token_merges(list(merges))
  if types is not None:
    w.add_token_types(list(types))
  if bos is not None:
    w.add_bos_token_id(bos)
  if template is not None:
    w.add_chat_template(template)
  w.add_tensor("x", np.zeros(2, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_tokenizer_metadata_problems_are_named(tmp_path):
  path = tmp_path / "t.gguf"
  _write_gguf_tokenizer(path, bos=3, template="{{ bos_token }}", types=[1, 1, 1, 3])
  tok = load_tokenizer(str(path))
  assert (tok.bos_id, tok.bos_token, tok.encode("ab")) == (3, "<s>", [2])
  for kwargs, message in [
      (dict(bos=9), r"GGUF metadata tokenizer\.ggml\.bos_token_id = 9 is not a token id \(the "
                    r"vocabulary has 4 tokens\)"),
      (dict(template="{% if %}"), r"GGUF metadata tokenizer\.chat_template: not a valid Jinja "
                                  r"template \(line 1: Expected an expression"),
      (dict(tokens=None), r"GGUF metadata has no tokenizer\.ggml\.tokens / merges"),
      (dict(types=[1, 1]), r"GGUF metadata tokenizer\.ggml\.token_type has 2 entries for 4 tokens"),
      (dict(merges=["ab"]), r"GGUF metadata tokenizer\.ggml\.merges entry 0 'ab' is not two "
                            r"tokens"),
      (dict(merges=["a z"]), r"GGUF metadata tokenizer\.ggml\.tokens / merges do not make a "
                             r"BPE tokenizer \(.*`z` out of vocabulary"),
  ]:
    _write_gguf_tokenizer(path, **kwargs)
    with pytest.raises(TokenizerError, match=r"t\.gguf: " + message):
      load_tokenizer(str(path))


def test_garbage_gguf_tokenizer_names_the_file(tmp_path):
  (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(TokenizerError, match=r"bad\.gguf: not a readable GGUF file"):
    load_tokenizer(str(tmp_path / "bad.gguf"))


# ------------------------------------------------------------------------------ generate CLI


def test_generate_cli_refuses_a_tokenizer_larger_than_the_model(saved, capsys):
  _word_tokenizer_dir(saved, 200)  # model vocabulary: 101
  assert generate_cli.main(["--model", str(saved), "--prompt", "w150", "--raw"]) == 2
  assert "the tokenizer has 200 tokens, more than the model's vocabulary of 101" in \
      capsys.readouterr().err


def test_generate_cli_bad_sampling_flag_is_one_line(saved, capsys):
  _word_tokenizer_dir(saved, 50)
  assert generate_cli.main(["--model", str(saved), "--prompt", "w3", "--raw",
                            "--max-new-tokens", "0"]) == 2
  assert "error: generate: max_new_tokens must be an integer >= 1" in capsys.readouterr().err
