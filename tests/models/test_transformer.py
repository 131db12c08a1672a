"""Invariance tests of the NNX transformer: padding, packing, cache, dtypes, sharding names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.models import ConfigError, KVCache, ModelConfig, Transformer
from postrl.models.transformer import positions_from_segments, rope_inv_freq
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
  return Transformer(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
  graphdef, params = nnx.split(model)

  @jax.jit
  def f(params, tokens, positions=None, segments=None):
    return nnx.merge(graphdef, params)(tokens, positions_BxT=positions, segment_ids_BxT=segments)

  return lambda *a, **k: f(params, *a, **k)


def _tokens(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(3, 101, shape), jnp.int32)


def test_right_padding_does_not_change_real_tokens(forward):
  tokens = _tokens((1, 12))
  full = forward(tokens)
  padded = jnp.concatenate([tokens, jnp.zeros((1, 4), jnp.int32)], axis=1)
  seg = jnp.concatenate([jnp.ones((1, 12), jnp.int32), jnp.zeros((1, 4), jnp.int32)], axis=1)
  out = forward(padded, segments=seg)
  np.testing.assert_allclose(out[:, :12], full, rtol=1e-5, atol=1e-6)


def test_left_padding_with_segments_equals_sliced(forward):
  tokens = _tokens((1, 10))
  ref = forward(tokens)
  padded = jnp.concatenate([jnp.zeros((1, 6), jnp.int32), tokens], axis=1)
  seg = jnp.concatenate([jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 10), jnp.int32)], axis=1)
  out = forward(padded, segments=seg)  # positions restart at the first real token
  np.testing.assert_allclose(out[:, 6:], ref, rtol=1e-5, atol=1e-6)


def test_packed_equals_unpacked(forward):
  a, b = _tokens((1, 7), 1), _tokens((1, 9), 2)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 7 + [2] * 9], jnp.int32)
  out = forward(packed, segments=seg)
  np.testing.assert_allclose(out[:, :7], forward(a), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, 7:], forward(b), rtol=1e-5, atol=1e-6)


def test_without_segments_packing_would_leak(forward):
  # Guards the test above: without segment ids the second sequence does see the first.
  a, b = _tokens((1, 7), 1), _tokens((1, 9), 2)
  packed = jnp.concatenate([a, b], axis=1)
  out = forward(packed, positions=jnp.asarray([list(range(7)) + list(range(9))]))
  assert np.abs(np.asarray(out[:, 7:] - forward(b))).max() > 1e-3


def test_positions_from_segments():
  seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg),
                                [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 0]])


def test_cached_decode_equals_full_forward(model, forward):
  tokens = _tokens((2, 11))
  ref = forward(tokens)
  graphdef, params = nnx.split(model)

  @jax.jit
  def step(params, toks, pos, cache):
    return nnx.merge(graphdef, params).decode(toks, pos, cache)

  cache = KVCache.zeros(model.config, 2, 16)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  logits, cache = step(params, tokens[:, :6], pos, cache)
  outs = [logits]
  for t in range(6, 11):
    logits, cache = step(params, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
  cfg = tiny_config(num_key_value_heads=2)
  gqa = Transformer(cfg, rngs=nnx.Rngs(3))
  mha = Transformer(cfg.replace(num_key_value_heads=4), rngs=nnx.Rngs(4))
  hd = cfg.dim_per_head
  for lg, lm in zip(gqa.layers, mha.layers):
    for name in ("q_proj", "o_proj"):
      getattr(lm.self_attn, name).kernel.set_value(getattr(lg.self_attn, name).kernel[...])
    for name in ("k_proj", "v_proj"):  # kv head j serves query heads 2j and 2j+1
      k = getattr(lg.self_attn, name).kernel[...].reshape(cfg.hidden_size, 2, hd)
      getattr(lm.self_attn, name).kernel.set_value(jnp.repeat(k, 2, axis=1).reshape(-1, 4 * hd))
    for name in ("gate_proj", "up_proj", "down_proj"):
      getattr(lm.mlp, name).kernel.set_value(getattr(lg.mlp, name).kernel[...])
  mha.embed_tokens.set_value(gqa.embed_tokens[...])
  mha.lm_head.set_value(gqa.lm_head[...])
  tokens = _tokens((2, 8))
  np.testing.assert_allclose(mha(tokens), gqa(tokens), rtol=1e-5, atol=1e-6)


def test_bfloat16_params_and_compute_close_to_float32():
  cfg = tiny_config()
  m32 = Transformer(cfg, rngs=nnx.Rngs(0))
  m16 = Transformer(cfg.replace(param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(1))
  nnx.update(m16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
  assert m16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  tokens = _tokens((2, 8))
  out32, out16 = m32(tokens), m16(tokens)
  assert out16.dtype == jnp.float32  # logits accumulate in float32
  rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
  assert rel < 2e-2, rel


def test_every_param_has_logical_axes(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, (path, names)


def test_tied_embeddings_share_matrix():
  m = Transformer(tiny_config(tie_word_embeddings=True), rngs=nnx.Rngs(0))
  assert m.lm_head is None
  h = m.hidden_states(_tokens((1, 4)))
  np.testing.assert_allclose(m.logits(h), jnp.einsum("btd,vd->btv", h, m.embed_tokens[...]),
                             rtol=1e-5, atol=1e-6)


def test_llama3_rope_scaling_golden():
  # Frequencies far below the original context are divided by `factor`, high ones are kept.
  cfg = tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  base = rope_inv_freq(tiny_config())
  scaled = rope_inv_freq(cfg)
  wavelen = 2 * np.pi / np.asarray(base)
  np.testing.assert_allclose(scaled[wavelen < 16], base[wavelen < 16], rtol=1e-6)
  np.testing.assert_allclose(scaled[wavelen > 64], base[wavelen > 64] / 8, rtol=1e-6)
  assert np.any((wavelen >= 16) & (wavelen <= 64))


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="num_key_value_heads"):
    tiny_config(num_key_value_heads=3)
  with pytest.raises(ConfigError, match="rope_scaling"):
    tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
    ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
  with pytest.raises(ConfigError, match="missing field"):
    ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


def test_config_hashable_and_roundtrips_hf():
  cfg = tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  hash(cfg)
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg.replace(head_dim=cfg.dim_per_head)
  qwen = tiny_config(model_type="qwen2", qkv_bias=True)
  assert ModelConfig.from_hf(qwen.to_hf()) == qwen.replace(head_dim=qwen.dim_per_head)
