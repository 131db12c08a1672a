"""Calibration statistics: equal to a hand-written forward, padding excluded, chunking invariant,
sequential inputs from the compressed blocks, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.models import Transformer
from postrl.models.transformer import Linear, positions_from_segments, rope_inv_freq
from postrl.quant import QuantError
from postrl.quant.calibrate import block_linears, calibrate, calibrate_sequential
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (5, 12))
  seg = np.ones((5, 12), np.int32)
  seg[1, 9:] = 0  # right padding
  seg[3, 7:] = 0
  return cfg, model, tokens, seg


def _manual_inputs(model, tokens, seg):
  """Inputs of layers.0 q_proj and down_proj, and the block-0 output, written out by hand."""
  blk = model.layers[0]
  seg = jnp.asarray(seg)
  pos = positions_from_segments(seg)
  T = tokens.shape[1]
  mask = jnp.tril(jnp.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  h = jnp.take(model.embed_tokens[...], jnp.asarray(tokens), axis=0)
  n = blk.input_layernorm(h)
  attn, _ = blk.self_attn(n, pos, mask, rope_inv_freq(model.config))
  a = h + attn
  m = blk.post_attention_layernorm(a)
  inter = jax.nn.silu(blk.mlp.gate_proj(m)) * blk.mlp.up_proj(m)
  real = np.asarray(seg).reshape(-1) > 0
  flat = lambda v: np.asarray(v, np.float64).reshape(-1, v.shape[-1])[real]
  return flat(n), flat(inter)


def _check(stats, x):
  n = x.shape[0]
  assert stats.num_tokens == n
  np.testing.assert_allclose(stats.hessian_KxK, 2 * x.T @ x / n, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats.mean_abs_K, np.abs(x).mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats.max_abs_K, np.abs(x).max(0), rtol=1e-6)
  np.testing.assert_allclose(stats.sq_norm_K, (x * x).sum(0), rtol=1e-5)


def test_stats_match_manual_forward_and_exclude_padding(setup):
  _, model, tokens, seg = setup
  x_qkv, x_down = _manual_inputs(model, tokens, seg)
  for batch_size in (2, 8):  # 3 chunks (last one padded with weight-0 rows) or one
    stats = calibrate(model, tokens, segment_ids_BxT=seg, batch_size=batch_size)
    assert len(stats) == 14 and "layers.1.mlp.down_proj" in stats
    for name in ("q_proj", "k_proj", "v_proj"):
      _check(stats[f"layers.0.self_attn.{name}"], x_qkv)
    _check(stats["layers.0.mlp.down_proj"], x_down)
  assert Linear.__call__.__name__ == "__call__"  # the recording wrapper is gone


def test_sequential_uses_compressed_outputs(setup):
  cfg, model, tokens, seg = setup
  model = nnx.clone(model)
  calls = []

  def zero_block(i, stats):
    calls.append((i, sorted(stats)))
    if i == 0:  # block 0 becomes the identity (residual only): block 1 then reads the embeddings
      for lin in block_linears(model, 0).values():
        lin.kernel[...] = jnp.zeros_like(lin.kernel[...])

  calibrate_sequential(model, tokens, zero_block, segment_ids_BxT=seg, batch_size=2,
                       keep_inputs=20)
  assert [c[0] for c in calls] == [0, 1]
  assert calls[1][1][0] == "layers.1.mlp.down_proj" and len(calls[1][1]) == 7
  # layers.1's q_proj input is input_layernorm_1(embeddings) on the real tokens
  h = jnp.take(model.embed_tokens[...], jnp.asarray(tokens), axis=0)
  x = np.asarray(model.layers[1].input_layernorm(h), np.float64).reshape(-1, cfg.hidden_size)
  x = x[seg.reshape(-1) > 0]
  stats1 = {}
  calibrate_sequential(model, tokens, lambda i, s: stats1.update(s) if i == 1 else None,
                       segment_ids_BxT=seg, keep_inputs=20)
  _check(stats1["layers.1.self_attn.q_proj"], x)
  kept = stats1["layers.1.self_attn.q_proj"].inputs_NxK
  assert kept.shape == (20, cfg.hidden_size)
  # every kept row is one of the real inputs
  d = np.abs(kept[:, None, :] - x[None]).max(-1).min(-1)
  assert d.max() < 1e-5


def test_without_hessian(setup):
  _, model, tokens, _ = setup
  stats = calibrate(model, tokens[:2], with_hessian=False)
  assert stats["layers.0.self_attn.q_proj"].hessian_KxK is None
  assert stats["layers.0.self_attn.q_proj"].max_abs_K.shape == (64,)


def test_bad_input(setup):
  cfg, model, tokens, seg = setup
  with pytest.raises(QuantError, match="token ids must lie in"):
    calibrate(model, tokens + cfg.vocab_size)
  with pytest.raises(QuantError, match=r"\[B, T\]"):
    calibrate(model, tokens[0])
  with pytest.raises(QuantError, match="integer token ids"):
    calibrate(model, tokens.astype(np.float32))
  with pytest.raises(QuantError, match="no real token"):
    calibrate(model, tokens, segment_ids_BxT=np.zeros_like(seg))
  with pytest.raises(QuantError, match="postrl Transformer"):
    calibrate(model.layers[0], tokens)
  with pytest.raises(QuantError, match="segment_ids_BxT shape"):
    calibrate(model, tokens, segment_ids_BxT=seg[:, :3])
