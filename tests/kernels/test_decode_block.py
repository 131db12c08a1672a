"""kernels.decode_block: one decoder layer's cached step as five fused Triton kernels (interpret
mode on CPU) against the model's own arithmetic, the cache slots it writes, the model's decode
with it, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.decode_attention import GpuConfig as AttentionConfig
from kernels.decode_block import (GpuConfig, KernelShapeError, attention_half_gpu,
                                  attention_half_reference, check_shapes, choose_impl,
                                  decode_layer, decode_layer_reference, default_config,
                                  mlp_half_gpu, mlp_half_reference)
from postrl import peft
from postrl.models import ConfigError, Transformer
from postrl.models.transformer import KVCache, rope_inv_freq
from tests.conftest import tiny_config

D, F, H, K, DH, S = 64, 128, 4, 2, 32, 40
BIASES = ("q_bias", "k_bias", "v_bias", "o_bias", "gate_bias", "up_bias", "down_bias")


def _weights(seed=0, biases=False, dtype=jnp.float32):
  shapes = dict(input_norm=(D,), q=(D, H * DH), k=(D, K * DH), v=(D, K * DH), o=(H * DH, D),
                post_norm=(D,), gate=(D, F), up=(D, F), down=(F, D))
  if biases:
    shapes.update(q_bias=(H * DH,), k_bias=(K * DH,), v_bias=(K * DH,), o_bias=(D,),
                  gate_bias=(F,), up_bias=(F,), down_bias=(D,))
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  out = {}
  for key, (name, shape) in zip(keys, sorted(shapes.items())):
    w = jax.random.normal(key, shape) * (0.3 if name.endswith("norm") else 0.1)
    out[name] = (w + 1.0 if name.endswith("norm") else w).astype(dtype)
  return out


def _state(b, dtype=jnp.float32, seed=1):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (b, D)).astype(dtype)
  ck = jax.random.normal(keys[1], (b, S, K, DH)).astype(dtype)
  cv = jax.random.normal(keys[2], (b, S, K, DH)).astype(dtype)
  return x, ck, cv


INV_FREQ = 1.0 / (10000.0 ** (jnp.arange(0, DH, 2, dtype=jnp.float32) / DH))


def _both(x, pos, w, ck, cv, dtype=jnp.float32, config=None, impl="pallas"):
  kw = dict(eps=1e-5, dtype=dtype)
  want = decode_layer(x, pos, INV_FREQ, w, ck, cv, impl="xla", **kw)
  got = decode_layer(x, pos, INV_FREQ, w, ck, cv, impl=impl, interpret=True, config=config, **kw)
  return want, got


@pytest.mark.parametrize("impl", ["pallas", "pallas_persistent"])
@pytest.mark.parametrize("b,biases,chunks,block_k,heads_per_step", [
    (1, False, None, 256, None),  # one row (padded to 16), default chunks; D = 64: the tail steps
    (3, True, 3, 32, 1),          # every bias; 3 chunks, empty ones at position 0; K loops of 32
    (16, False, 2, 16, 2),        # the most rows a program takes; 16-wide K steps
])
def test_kernels_equal_the_model_arithmetic_in_float32(b, biases, chunks, block_k, heads_per_step,
                                                       impl):
  """The five launches, and the same five phases as one persistent launch (interpret mode: one
  program running every task of each phase in turn)."""
  x, ck, cv = _state(b)
  pos = jnp.array([0, 17, S - 1] * 6)[:b] if b > 1 else jnp.array([23])
  config = dataclasses.replace(default_config(D, F, H, DH), block_k=block_k,
                               heads_per_step=heads_per_step,
                               attention=AttentionConfig(block_s=16, chunks=chunks))
  want, got = _both(x, pos, _weights(biases=biases), ck, cv, config=config, impl=impl)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=2e-5, atol=2e-5)
  for w_cache, g_cache in zip(want[1:], got[1:]):  # the new slot, and nothing else, written
    np.testing.assert_allclose(np.asarray(g_cache), np.asarray(w_cache), rtol=2e-5, atol=2e-5)
    changed = np.any(np.asarray(g_cache) != np.asarray(ck if g_cache is got[1] else cv), axis=(2, 3))
    assert changed.sum(axis=1).tolist() == [1] * b
    assert np.argmax(changed, axis=1).tolist() == np.asarray(pos).tolist()


@pytest.mark.parametrize("impl", ["pallas_attention", "pallas_mlp"])
def test_one_half_fused_equals_the_model_arithmetic(impl):
  """Each half of the layer through its kernels, the other through XLA: the same layer and the
  same cache writes (every bias, 3 rows, 2 attention chunks)."""
  x, ck, cv = _state(3)
  pos = jnp.array([0, 17, S - 1])
  w = _weights(biases=True)
  config = dataclasses.replace(default_config(D, F, H, DH), block_k=32,
                               attention=AttentionConfig(block_s=16, chunks=2))
  kw = dict(eps=1e-5, dtype=jnp.float32)
  want = decode_layer(x, pos, INV_FREQ, w, ck, cv, impl="xla", **kw)
  got = decode_layer(x, pos, INV_FREQ, w, ck, cv, impl=impl, interpret=True, config=config, **kw)
  for g, wnt in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(wnt), rtol=2e-5, atol=2e-5)
  if impl == "pallas_mlp":  # its XLA half with the decode-attention kernel, as the model runs it
    got = decode_layer(x, pos, INV_FREQ, w, ck, cv, impl=impl, interpret=True, config=config,
                       attention_impl="pallas", **kw)
    for g, wnt in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(wnt), rtol=2e-5, atol=2e-5)


def test_the_halves_compose_to_the_layer():
  """attention_half_* then mlp_half_* is the layer, in the reference and in the kernels."""
  x, ck, cv = _state(2)
  pos = jnp.array([4, 30])
  w = _weights(seed=2)
  kw = dict(eps=1e-5, dtype=jnp.float32)
  a, rk, rv = attention_half_reference(x, pos, INV_FREQ, w, ck, cv, **kw)
  layer = decode_layer_reference(x, pos, INV_FREQ, w, ck, cv, **kw)
  np.testing.assert_array_equal(np.asarray(mlp_half_reference(a, w, **kw)), np.asarray(layer[0]))
  np.testing.assert_array_equal(np.asarray(rk), np.asarray(layer[1]))
  ga, gk, _ = attention_half_gpu(x, pos, INV_FREQ, w, ck, cv, interpret=True, **kw)
  np.testing.assert_allclose(np.asarray(ga), np.asarray(a), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(rk), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(mlp_half_gpu(a, w, interpret=True, **kw)),
                             np.asarray(layer[0]), rtol=2e-5, atol=2e-5)
  # the residual: a half that dropped it would be off by x (or a) itself
  assert float(jnp.max(jnp.abs(a - x))) < 0.5 * float(jnp.max(jnp.abs(x)))


@pytest.mark.parametrize("impl", ["pallas", "pallas_persistent"])
def test_bfloat16_within_rounding(impl):
  x, ck, cv = _state(4, jnp.bfloat16)
  pos = jnp.array([3, 0, 39, 20])
  want, got = _both(x, pos, _weights(dtype=jnp.bfloat16), ck, cv, dtype=jnp.bfloat16, impl=impl)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
  for w, g in zip(want, got):
    w, g = np.asarray(w, np.float32), np.asarray(g, np.float32)
    assert np.max(np.abs(w - g)) <= 0.02 * np.max(np.abs(w)), np.max(np.abs(w - g))


@pytest.mark.parametrize("impl", ["pallas", "pallas_persistent"])
def test_bfloat16_caches_under_float32_compute(impl):
  """Caches in another dtype than the compute (k / v rounded to bf16 when written, q to the
  cache dtype for the attention kernel, its output back to float32): as the model's layer."""
  x, ck, cv = _state(3)
  ck, cv = ck.astype(jnp.bfloat16), cv.astype(jnp.bfloat16)
  want, got = _both(x, jnp.array([2, 30, 11]), _weights(biases=True), ck, cv, impl=impl)
  assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.bfloat16
  for w, g in zip(want, got):
    w, g = np.asarray(w, np.float32), np.asarray(g, np.float32)
    assert np.max(np.abs(w - g)) <= 0.02 * np.max(np.abs(w)), np.max(np.abs(w - g))


def test_reference_is_the_model_block():
  """The reference (what the kernels are held to) is the model's Block at one cached token."""
  cfg = tiny_config(head_dim=DH, intermediate_size=F, qkv_bias=True, o_bias=True, mlp_bias=True)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(3), 100))
  nnx.update(model, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape),
                                 params))  # biases and norms away from 0 / 1
  layer = model.layers[1]
  x, ck, cv = _state(2)
  pos = jnp.array([5, 31])
  inv = rope_inv_freq(cfg)
  mask = jnp.arange(S)[None, None, :] <= pos[:, None, None]
  want, (wk, wv) = layer(x[:, None], pos[:, None], mask, inv, (ck, cv))
  got, gk, gv = decode_layer_reference(x, pos, inv, layer.decode_weights(), ck, cv, eps=1e-5,
                                       dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, 0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(gk), np.asarray(wk))
  np.testing.assert_array_equal(np.asarray(gv), np.asarray(wv))


def _models(impl="pallas", **overrides):
  cfg = tiny_config(head_dim=DH, intermediate_size=F, **overrides)
  xla = Transformer(dataclasses.replace(cfg, decode_block_impl="xla"), rngs=nnx.Rngs(0))
  fused = Transformer(dataclasses.replace(cfg, decode_block_impl=impl), rngs=nnx.Rngs(0))
  return cfg, xla, fused


@pytest.mark.parametrize("impl,attention", [("pallas", "auto"), ("pallas_attention", "auto"),
                                            # XLA's attention half through the attention kernel,
                                            # as Attention runs it with this setting
                                            ("pallas_mlp", "pallas"),
                                            ("pallas_persistent", "auto")])
def test_model_decode_with_the_kernels_equals_xla(impl, attention):
  cfg, xla, fused = _models(impl, qkv_bias=True, decode_attention_impl=attention)
  assert fused._xla_attention_impl() == ("pallas" if attention == "pallas" else "xla")  # pylint: disable=protected-access
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
  cache = KVCache.zeros(cfg, 2, 16)
  _, cache = xla.decode(tokens, jnp.broadcast_to(jnp.arange(6), (2, 6)), cache)
  cache_x = cache_f = cache
  tok = tokens[:, -1:]
  for step in range(6, 9):  # three cached steps, each feeding its greedy token back
    pos = jnp.full((2, 1), step)
    lx, cache_x = xla.decode(tok, pos, cache_x)
    lf, cache_f = fused.decode(tok, pos, cache_f)
    np.testing.assert_allclose(np.asarray(lf), np.asarray(lx), rtol=1e-5, atol=1e-5)
    tok = jnp.argmax(lx[:, -1], axis=-1)[:, None]
  for a, b in zip(cache_f.k + cache_f.v, cache_x.k + cache_x.v):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_persistent_layers_share_one_barrier_state():
  """``decode_layers`` with the persistent layer: three layers equal XLA's, and the one barrier
  state went through all of them (4 barriers x 1 program each, none timed out)."""
  from kernels.decode_block import barrier_timeouts, decode_layers  # pylint: disable=import-outside-toplevel
  x, ck, cv = _state(2)
  pos = jnp.array([3, S - 1])
  layers = [_weights(seed=s) for s in range(3)]
  kw = dict(eps=1e-5, dtype=jnp.float32)
  want = decode_layers(x, pos, INV_FREQ, layers, [ck] * 3, [cv] * 3, impl="xla", **kw)
  assert want[3] is None  # other implementations pass the state through
  got = decode_layers(x, pos, INV_FREQ, layers, [ck] * 3, [cv] * 3, impl="pallas_persistent",
                      interpret=True, **kw)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=2e-5, atol=2e-5)
  for g, w in zip(got[1] + got[2], want[1] + want[2]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
  # each launch's last program out set the counters back to 0; no wait timed out
  assert got[3].tolist() == [0, 0, 0] and int(barrier_timeouts(got[3])) == 0
  again = decode_layers(x, pos, INV_FREQ, layers, [ck] * 3, [cv] * 3, impl="pallas_persistent",
                        interpret=True, sync=got[3], **kw)  # the state a step returned
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(got[0]))
  with pytest.raises(ValueError, match="3 layers, 2 k caches"):
    decode_layers(x, pos, INV_FREQ, layers, [ck] * 2, [cv] * 3, impl="xla", **kw)


def test_a_barrier_that_never_fills_times_out_instead_of_hanging():
  """Two programs in interpret mode run one after the other, so the first waits at a barrier the
  second never reaches before it ends (on a GPU: programs not all resident). Its first wait gives
  up after ``max_polls`` reads, its three later waits end at once (a wait has failed), each
  counts a timeout; the second program passes its barriers; both write NaN into their columns of
  x'; the last one out sets the counters back to 0: the call returns, visibly wrong."""
  from kernels.decode_block import barrier_timeouts, decode_layer_persistent  # pylint: disable=import-outside-toplevel
  x, ck, cv = _state(1)
  for poll in ("atomic", "load"):
    config = dataclasses.replace(default_config(D, F, H, DH), programs=2, max_polls=3, poll=poll)
    out, _, _, sync = decode_layer_persistent(x, jnp.array([5]), INV_FREQ, _weights(), ck, cv,
                                              eps=1e-5, dtype=jnp.float32, config=config,
                                              interpret=True)
    assert sync.tolist() == [0, 4, 0] and int(barrier_timeouts(sync)) == 4, poll
    assert bool(jnp.all(jnp.isnan(out))), poll
  with pytest.raises(ValueError, match=r"sync must be int32 \[3\]"):
    decode_layer_persistent(x, jnp.array([5]), INV_FREQ, _weights(), ck, cv, eps=1e-5,
                            dtype=jnp.float32, interpret=True, sync=jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("programs,n", [(1, 7), (3, 7), (4, 4), (5, 2), (2, 9)])
def test_every_task_runs_once_over_the_programs(programs, n):
  """The persistent layer's split of a phase's n tasks over P programs (t = i, i + P, ...)."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  from kernels.decode_block.persistent import _for_tasks  # pylint: disable=import-outside-toplevel

  def kernel(_, o_ref):
    _for_tasks(n, programs, lambda t: plgpu.atomic_add(o_ref, t, jnp.int32(1)))
  counts = pl.pallas_call(kernel, grid=(programs,), interpret=True, input_output_aliases={0: 0},
                          out_shape=jax.ShapeDtypeStruct((16,), jnp.int32))(
                              jnp.zeros((16,), jnp.int32))
  assert np.asarray(counts).tolist() == [1] * n + [0] * (16 - n)


def test_model_chooses_xla_unless_asked():
  _, xla, fused = _models()
  assert choose_impl("auto") == "xla"  # not timed on a GPU yet (GPU_MEASURED is False)
  assert not xla._fused_decode(2)  # pylint: disable=protected-access
  auto = Transformer(tiny_config(head_dim=DH, intermediate_size=F), rngs=nnx.Rngs(0))
  assert not auto._fused_decode(2)  # pylint: disable=protected-access
  assert fused._fused_decode(2)  # pylint: disable=protected-access


@pytest.mark.parametrize("change,message,impl", [
    (lambda m: peft.apply_lora(m, rank=2, alpha=4.0, targets=r"self_attn\.(q|v)_proj"),
     "unmerged adapter", "pallas"),
    (lambda m: None, "17 rows", "pallas"),
    (lambda m: None, "17 rows", "pallas_mlp"),
])
def test_pallas_on_a_model_it_cannot_run_is_a_clear_error(change, message, impl):
  cfg, _, fused = _models(impl)
  change(fused)
  rows = 17 if message == "17 rows" else 2
  cache = KVCache.zeros(cfg, rows, 8)
  with pytest.raises(ConfigError, match=f"decode_block_impl='{impl}' cannot run.*{message}"):
    fused.decode(jnp.zeros((rows, 1), jnp.int32), jnp.zeros((rows, 1), jnp.int32), cache)


def test_config_rejects_an_unknown_impl():
  with pytest.raises(ConfigError, match="decode_block_impl"):
    tiny_config(decode_block_impl="triton")


def test_bad_input_is_named():
  x, ck, cv = _state(2)
  pos = jnp.array([1, 2])
  w = _weights()
  call = lambda **kw: decode_layer(**{**dict(x_BxD=x, positions_B=pos, inv_freq=INV_FREQ,  # noqa: E731
                                              weights=w, cache_k=ck, cache_v=cv, eps=1e-5,
                                              impl="pallas", interpret=True), **kw})
  with pytest.raises(ValueError, match=r"lacks \['down'\]"):
    call(weights={k: v for k, v in w.items() if k != "down"})
  with pytest.raises(ValueError, match="unknown weights"):
    call(weights={**w, "qbias": w["input_norm"]})
  with pytest.raises(ValueError, match="go together"):
    call(weights={**w, "q_bias": jnp.zeros(H * DH)})
  with pytest.raises(ValueError, match=r"weights\['o'\] has shape"):
    call(weights={**w, "o": w["o"][:, :32]})
  with pytest.raises(ValueError, match="floating point"):
    call(weights={**w, "gate": w["gate"].astype(jnp.int8)})
  with pytest.raises(ValueError, match="positions_B must be integers"):
    call(positions_B=pos.astype(jnp.float32))
  with pytest.raises(ValueError, match="do not agree on B"):
    call(positions_B=jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match="config must be"):
    call(config=AttentionConfig())
  with pytest.raises(ValueError, match="need an NVIDIA GPU"):
    call(interpret=False)
  with pytest.raises(ValueError, match="impl must be one of"):
    call(impl="triton")


def test_shapes_the_kernels_cannot_take():
  cfg = GpuConfig()
  check_shapes(16, 576, 1536, 9, 3, 64, default_config(576, 1536, 9, 64))  # SmolLM2-135M
  with pytest.raises(KernelShapeError, match="17 rows"):
    check_shapes(17, D, F, H, K, DH, cfg)
  with pytest.raises(KernelShapeError, match="MLP width 120"):
    check_shapes(1, D, 120, H, K, DH, cfg)
  with pytest.raises(KernelShapeError, match="head_dim 16"):
    check_shapes(1, D, F, H, K, 16, cfg)
  with pytest.raises(KernelShapeError, match="block_n=24"):
    check_shapes(1, D, F, H, K, DH, GpuConfig(block_n=24))
  with pytest.raises(KernelShapeError, match="attention"):
    check_shapes(1, D, F, 34, 2, DH, cfg)  # 17 query heads per kv head
  with pytest.raises(KernelShapeError, match="heads_per_step=3"):
    check_shapes(1, D, F, H, K, DH, GpuConfig(heads_per_step=3))
  with pytest.raises(KernelShapeError, match="programs=0"):
    check_shapes(1, D, F, H, K, DH, GpuConfig(programs=0))
  with pytest.raises(KernelShapeError, match="max_polls=0"):
    check_shapes(1, D, F, H, K, DH, GpuConfig(max_polls=0))
  with pytest.raises(KernelShapeError, match="poll='spin'"):
    check_shapes(1, D, F, H, K, DH, GpuConfig(poll="spin"))
  check_shapes(1, 960, 2560, 15, 5, 64, default_config(960, 2560, 15, 64))  # SmolLM2-360M


def test_k_loop_covers_any_multiple_of_16_once():
  """The K loop's steps tile [0, K) exactly: block_k steps, then power-of-two remainders."""
  from kernels.decode_block.gpu import _k_loop  # pylint: disable=import-outside-toplevel
  sizes = []

  def step(start, size, covered):
    sizes.append(size)
    hit = jax.lax.dynamic_slice(covered, (start,), (size,)) + 1
    return jax.lax.dynamic_update_slice(covered, hit, (start,))
  for k, bk in ((576, 256), (960, 256), (64, 256), (2048, 64), (16, 16), (208, 32)):
    sizes.clear()
    covered = _k_loop(k, bk, step, jnp.zeros(k, jnp.int32))
    assert np.all(np.asarray(covered) == 1), (k, bk)
    assert set(sizes) <= {16, 32, 64, 128, 256} and max(sizes) == min(bk, max(sizes))


def test_generate_with_the_kernels_gives_the_same_tokens():
  """generate with decode_block_impl='pallas' (interpret mode on CPU) against 'xla': the same
  greedy tokens and log-probs up to float rounding, prompts of different lengths."""
  from postrl.sampling import generate, pad_prompts  # pylint: disable=import-outside-toplevel
  _, xla, fused = _models(qkv_bias=True)
  tokens, lengths = pad_prompts([[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]])
  kw = dict(max_new_tokens=5, temperature=0.0, eos_ids=())
  want, got = generate(xla, tokens, lengths, **kw), generate(fused, tokens, lengths, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens_BxN), np.asarray(want.tokens_BxN))
  np.testing.assert_allclose(np.asarray(got.model_logps_BxN), np.asarray(want.model_logps_BxN),
                             atol=1e-4)


def test_generate_refuses_the_kernels_on_several_devices():
  from postrl.sampling import generate, pad_prompts  # pylint: disable=import-outside-toplevel
  _, _, fused = _models()
  graphdef, params = nnx.split(fused)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  tokens, lengths = pad_prompts([[5, 6, 7]])
  with pytest.raises(ValueError, match="decode_block_impl='pallas': the fused decoder layer runs "
                                       "on one device; the parameters span 2"):
    generate((graphdef, params), tokens, lengths, max_new_tokens=2, temperature=0.0)


@pytest.mark.parametrize("impl", ["pallas", "pallas_persistent"])
def test_a_position_past_the_cache_writes_nothing(impl):
  """The model's write drops a slot past the cache (``write_slots``, mode="drop") and its mask
  then attends every slot; the kernels do the same and never write past the cache."""
  x, ck, cv = _state(2)
  pos = jnp.array([S + 3, 4])
  want, got = _both(x, pos, _weights(), ck, cv, impl=impl)
  for w, g in zip(want, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(got[1][0]), np.asarray(ck[0]))  # row 0: untouched


def test_persistent_trace_records_each_program_at_each_barrier():
  """``GpuConfig(trace=True)``: one row of timestamps per program, in ``TRACE`` order (interpret
  mode records the counters instead of the GPU's clock: entry 0, arrival k and leaving k at k,
  exit the exit counter's old value 0), and ``summarise_trace`` turns [L, P, 10] timestamps into
  phase and barrier times."""
  from kernels.decode_block import decode_layer_persistent  # pylint: disable=import-outside-toplevel
  from kernels.decode_block.persistent import TRACE, summarise_trace  # pylint: disable=import-outside-toplevel
  x, ck, cv = _state(2)
  config = dataclasses.replace(default_config(D, F, H, DH), trace=True)
  out = decode_layer_persistent(x, jnp.array([3, 9]), INV_FREQ, _weights(), ck, cv, eps=1e-5,
                                dtype=jnp.float32, config=config, interpret=True)
  assert len(out) == 5 and out[4].shape == (1, len(TRACE))
  assert out[4][0].tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 0]
  # two launches of two programs, in ns: entry, (arrive, leave) x 4, exit
  one = [[0, 1000, 1500, 3000, 3400, 4000, 4300, 6000, 6500, 8000],
         [200, 1200, 1600, 2500, 3300, 4100, 4400, 5000, 6400, 7000]]
  later = [[[t + 10000 for t in p] for p in one]]
  s = summarise_trace(np.array([one] + later))
  assert s["phase_1_us"] == 1.2 and s["barrier_1_us"] == 0.4  # last arrival 1200, last leave 1600
  assert s["phase_2_us"] == 3.0 - 1.6 and s["phase_5_us"] == 8.0 - 6.5
  assert s["launch_us"] == 8.0 and s["gap_us"] == 2.0  # 10000 - 8000
  parts = sum(s[f"phase_{k}_us"] for k in range(1, 6)) + sum(s[f"barrier_{k}_us"] for k in range(1, 5))
  assert abs(parts - s["launch_us"]) < 1e-9  # the phases and barriers cover the launch
  assert s["resolution_ns"] == 100 and s["wait_1_us"] == (0.5 + 0.4) / 2
  for shift in (100, 7100, 9100):  # the clock wraps between entries, inside a launch, at exits
    wrapped = summarise_trace((np.array([one] + later) + (1 << 32) - shift) % (1 << 32))
    assert {k: wrapped[k] for k in ("phase_1_us", "launch_us", "gap_us", "barrier_4_us")} == {
        k: s[k] for k in ("phase_1_us", "launch_us", "gap_us", "barrier_4_us")}, shift


@pytest.mark.parametrize("block_k", [32, 256])
def test_persistent_prefetch_equals_the_model_arithmetic(block_k):
  """``GpuConfig(prefetch=True)``: each program's first gate / up and down weights loaded before
  the barrier it waits at, then used as the first K step (block_k 32: 64 and 128 inputs, two and
  four steps; block_k 256: inputs shorter than one step, nothing loaded early)."""
  x, ck, cv = _state(3)
  config = dataclasses.replace(default_config(D, F, H, DH), block_k=block_k, prefetch=True,
                               attention=AttentionConfig(block_s=16, chunks=2))
  want, got = _both(x, jnp.array([0, 17, S - 1]), _weights(biases=True), ck, cv, config=config,
                    impl="pallas_persistent")
  for w, g in zip(want, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


def test_persistent_prefetch_uses_the_weights_loaded_early(monkeypatch):
  """The early loads are what the first K step multiplies: zeroing them changes the layer."""
  from kernels.decode_block import gpu as block_gpu  # pylint: disable=import-outside-toplevel
  x, ck, cv = _state(2)
  config = dataclasses.replace(default_config(D, F, H, DH), block_k=32, prefetch=True)
  pos = jnp.array([4, 9])
  want, _ = _both(x, pos, _weights(), ck, cv, config=config, impl="pallas_persistent")
  real = block_gpu.mlp_out_first_weights
  monkeypatch.setattr(block_gpu, "mlp_out_first_weights",
                      lambda *a, **k: jnp.zeros_like(real(*a, **k)))
  _, got = _both(x, pos, _weights(), ck, cv, config=config, impl="pallas_persistent")
  assert float(jnp.max(jnp.abs(got[0] - want[0]))) > 1e-3
