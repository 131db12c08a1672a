"""Quantized models: forward, decode and generate through quantized Linears; targets; bytes;
sharding on the 8-device mesh; bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from postrl import sharding
from postrl.models import Transformer
from postrl.quant import (QuantError, QuantizedWeight, QuantSpec, QuantStorage, dequantize_model,
                          linear_layers, model_nbytes, quantize_model, quantized_layers)
from postrl.sampling.generate import generate
from tests.conftest import tiny_config

TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 101, size=(2, 7)), jnp.int32)


@pytest.fixture(scope="module")
def float_model():
  # intermediate 96: down_proj has K = 96, ragged for group 64 (one full group, one of 32 rows)
  return Transformer(tiny_config(), rngs=nnx.Rngs(0))


def _np_rtn(w, bits, group, symmetric):
  """Independent numpy reference: groups of rows along K, per output column."""
  K, N = w.shape
  g = K if group is None else group
  out = np.empty_like(w)
  for start in range(0, K, g):
    blk = w[start:start + g]
    if symmetric:
      s = np.abs(blk).max(axis=0) / (2 ** (bits - 1) - 1)
      out[start:start + g] = np.clip(np.round(blk / s), -(2 ** (bits - 1) - 1),
                                     2 ** (bits - 1) - 1) * s
    else:
      lo, hi = blk.min(axis=0), blk.max(axis=0)
      s = (hi - lo) / (2 ** bits - 1)
      z = -2 ** (bits - 1) - np.round(lo / s)
      q = np.clip(np.round(blk / s) + z, -2 ** (bits - 1), 2 ** (bits - 1) - 1)
      out[start:start + g] = (q - z) * s
  return out


def test_default_targets_leave_embeddings_and_lm_head_float(float_model):
  q = quantize_model(float_model, "int8", copy=True)
  layers = quantized_layers(q)
  assert len(layers) == 14 and all(isinstance(k, QuantizedWeight) for k in layers.values())
  assert isinstance(q.embed_tokens, nnx.Param) and isinstance(q.lm_head, nnx.Param)
  params = nnx.state(q, nnx.Param)
  flat = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
  assert not any(name.endswith("kernel") for name in flat)  # quantized storage is not trainable
  storage = nnx.state(q, QuantStorage)
  assert len(nnx.to_flat_state(storage)) == 28  # w_q + scales per layer
  assert not quantized_layers(float_model)  # copy=True left the original float


def test_quantized_layer_matches_an_independent_reference(float_model):
  """Wrong axis, packing order or zero point would break this layer-level comparison."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 96)), jnp.float32)
  for spec in (QuantSpec(8), QuantSpec(4, 64), QuantSpec(4, 32, symmetric=False)):
    q = quantize_model(float_model, spec, targets=r"layers\.0\.mlp\.down_proj$", copy=True)
    w = np.asarray(float_model.layers[0].mlp.down_proj.kernel[...])
    ref = _np_rtn(w, spec.bits, spec.group_size, spec.symmetric)
    lin = q.layers[0].mlp.down_proj
    np.testing.assert_allclose(lin.dense_kernel(), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lin(x), np.asarray(x) @ ref, rtol=1e-5, atol=1e-6)


def test_int8_logits_close_to_float_and_equal_to_dequantised(float_model):
  q = quantize_model(float_model, "int8", copy=True)
  ref = np.asarray(float_model(TOKENS))
  got = np.asarray(q(TOKENS))
  assert np.max(np.abs(got - ref)) < 0.02 * np.max(np.abs(ref))
  deq = dequantize_model(q, copy=True)
  assert not quantized_layers(deq)
  np.testing.assert_allclose(got, deq(TOKENS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["int8", "int4_g64_asym", "nf4_dq"])
def test_generate_greedy_matches_dequantised_float_model(float_model, spec):
  q = quantize_model(float_model, spec, copy=True)
  deq = dequantize_model(q, copy=True)
  prompts = jnp.asarray([[5, 6, 7, 8], [9, 10, 0, 0]], jnp.int32)
  lengths = jnp.asarray([4, 2], jnp.int32)
  kw = dict(max_new_tokens=6, temperature=0.0, eos_ids=())
  a, b = generate(q, prompts, lengths, **kw), generate(deq, prompts, lengths, **kw)
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  np.testing.assert_allclose(a.model_logps_BxN, b.model_logps_BxN, rtol=1e-5, atol=1e-5)
  # decode agrees with the full forward pass on the prompt + generated tokens
  full = jnp.concatenate([prompts[:1], a.tokens_BxN[:1]], axis=1)
  logp = jax.nn.log_softmax(q(full), axis=-1)[0, 3:-1]
  np.testing.assert_allclose(jnp.take_along_axis(logp, a.tokens_BxN[0, :, None], axis=-1)[:, 0],
                             a.model_logps_BxN[0], rtol=1e-4, atol=1e-4)


def test_model_nbytes_counts_packed_storage(float_model):
  assert model_nbytes(float_model) == sum(
      x.size * 4 for x in jax.tree.leaves(nnx.state(float_model)))
  linears = {n: lin.kernel[...].shape for n, lin in linear_layers(float_model).items()}
  float_linear = sum(4 * k * n for k, n in linears.values())
  rest = model_nbytes(float_model) - float_linear
  q8 = quantize_model(float_model, "int8", copy=True)
  assert model_nbytes(q8) == rest + sum(k * n + 4 * n for k, n in linears.values())
  q4 = quantize_model(float_model, "int4_g32", copy=True)
  assert model_nbytes(q4) == rest + sum(k * n // 2 + 4 * (k // 32) * n for k, n in linears.values())
  assert model_nbytes(nnx.eval_shape(lambda: q4)) == model_nbytes(q4)


def test_targets_spec_functions_and_repeated_calls(float_model):
  q = quantize_model(float_model, "int4_g32", targets=r"mlp\.(up|gate)_proj", copy=True)
  assert sorted(quantized_layers(q)) == sorted(
      f"layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("up", "gate"))
  quantize_model(q, "int8", targets="self_attn")
  assert len(quantized_layers(q)) == 12
  assert quantized_layers(q)["layers.1.self_attn.q_proj"].spec == QuantSpec(8)
  with pytest.raises(QuantError, match=r"'mlp\\\\.up' matches only already-quantized layers"):
    quantize_model(q, "int8", targets=r"mlp\.up")
  mixed = quantize_model(float_model, lambda name: "nf4" if "mlp" in name else None, copy=True)
  assert sorted(quantized_layers(mixed)) == sorted(
      f"layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("up", "gate", "down"))


def test_custom_quantizer_gets_names_and_kxn_kernels(float_model):
  seen = {}

  def quantizer(name, w_KxN):
    seen[name] = w_KxN.shape
    return QuantizedWeight.quantize(w_KxN, "int8")  # no names: quantize_model attaches them

  q = quantize_model(float_model, quantizer=quantizer, copy=True)
  assert seen["layers.0.mlp.down_proj"] == (96, 64)
  assert seen["layers.1.self_attn.k_proj"] == (64, 32)
  kernel = q.layers[0].mlp.up_proj.kernel
  assert kernel.w_q.get_metadata()["out_sharding"] == ("embed", "mlp")
  # a float array result is written back as the float kernel (fake-quantized / pruned weights)
  halved = quantize_model(float_model, quantizer=lambda n, w: w * 0.5, targets="up_proj", copy=True)
  assert not quantized_layers(halved)
  np.testing.assert_allclose(halved.layers[1].mlp.up_proj.kernel[...],
                             float_model.layers[1].mlp.up_proj.kernel[...] * 0.5)


def test_bad_input_names_the_regex_or_the_layer(float_model):
  with pytest.raises(QuantError, match=r"targets regex 'lora_.\*' matches no Linear layer; Linear "
                                       r"layers: layers\.0\.mlp\.down_proj"):
    quantize_model(float_model, "int8", targets="lora_.*", copy=True)
  with pytest.raises(QuantError, match=r"targets '\(' is not a valid regex"):
    quantize_model(float_model, "int8", targets="(")
  with pytest.raises(QuantError, match="needs a spec"):
    quantize_model(float_model)
  with pytest.raises(QuantError, match="unknown quantization spec 'int2'"):
    quantize_model(float_model, "int2")
  with pytest.raises(QuantError, match=re.escape("layer layers.0.mlp.down_proj: quantizer "
                                                 "returned a QuantizedWeight of shape [64, 96]")):
    quantize_model(float_model, quantizer=lambda n, w: QuantizedWeight.quantize(w.T, "int8"),
                   targets="down_proj", copy=True)
  assert not quantized_layers(float_model)


def test_quantized_state_shards_on_the_8_device_mesh(float_model):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  q = quantize_model(float_model, "int4_g32", copy=True)
  ref = np.asarray(q(TOKENS))
  graphdef, state = nnx.split(q)
  shardings = sharding.state_shardings(state, mesh)
  up = shardings["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert up["w_q"].get_value().spec == P("fsdp", "tensor")  # [32, 96] packed
  assert up["scales"].get_value().spec == P("fsdp", "tensor")  # [2, 96]: groups follow K
  down = shardings["layers"][0]["mlp"]["down_proj"]["kernel"]
  assert down["w_q"].get_value().spec == P("tensor", "fsdp")  # [48, 64]
  assert down["scales"].get_value().spec == P(None, "fsdp")  # [3, 64]: 3 groups don't split
  placed = jax.device_put(state, shardings)
  w_q = placed["layers"][0]["mlp"]["up_proj"]["kernel"]["w_q"].get_value()
  assert w_q.addressable_shards[0].data.shape == (16, 48)
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(placed, TOKENS)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_export_refuses_quantized_storage_and_dequantised_model_round_trips(float_model, tmp_path):
  from postrl.models import load_pretrained, save_pretrained  # pylint: disable=import-outside-toplevel
  from postrl.models.weights import WeightsError  # pylint: disable=import-outside-toplevel
  q = quantize_model(float_model, "int8", copy=True)
  with pytest.raises(WeightsError, match="quantized storage.*dequantize_model"):
    save_pretrained(q, str(tmp_path / "q"))
  assert not (tmp_path / "q" / "model.safetensors").exists()   # nothing half-written
  dq = dequantize_model(q, copy=True)
  save_pretrained(dq, str(tmp_path / "dq"))
  back = load_pretrained(str(tmp_path / "dq"))
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % back.config.vocab_size
  np.testing.assert_allclose(back(tokens), dq(tokens), rtol=1e-5, atol=1e-5)
