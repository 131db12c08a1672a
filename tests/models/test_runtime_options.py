"""Runtime options of the model: attention_impl (the fused cuDNN path computes the model's own
attention) and remat (rematerialised blocks compute the same function).

cuDNN cannot run on CPU, so the fused call is checked through JAX's reference implementation of
the same ``jax.nn.dot_product_attention`` call (same mask, ``is_causal``, grouped heads), and the
model's wiring by swapping that reference in for cuDNN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.models import ConfigError, Transformer
from postrl.models import transformer as tfm
from tests.conftest import tiny_config


def _segment_mask(seg_BxT):
  T = seg_BxT.shape[1]
  causal = jnp.tril(jnp.ones((T, T), bool))[None]
  return causal & (seg_BxT[:, :, None] == seg_BxT[:, None, :])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_fused_attention_matches_einsum_attention(heads, kv_heads):
  B, T, D = 2, 12, 8
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (B, T, heads, D))
  k = jax.random.normal(kk, (B, T, kv_heads, D))
  v = jax.random.normal(kv, (B, T, kv_heads, D))
  # row 0: two packed sequences and padding (segment 0); row 1: one sequence
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
  mask = _segment_mask(seg)
  want = tfm.dot_product_attention(q, k, v, mask)
  got = tfm.fused_attention(q, k, v, mask, implementation="xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the segment mask matters: tokens of segment 2 must not see segment 1
  plain = tfm.fused_attention(q, k, v, _segment_mask(jnp.ones_like(seg)), implementation="xla")
  assert not np.allclose(plain[0, 5:9], want[0, 5:9], atol=1e-3)
  np.testing.assert_allclose(plain[0, :5], want[0, :5], rtol=1e-5, atol=1e-5)


def _model(attention_impl):
  cfg = tiny_config(param_dtype="float32", dtype="bfloat16", attention_impl=attention_impl)
  return Transformer(cfg, rngs=nnx.Rngs(0))


def _record_fused_calls(monkeypatch) -> list:
  """Swap JAX's reference of the same call in for cuDNN; the list collects each call's
  ``implementation``."""
  calls = []
  reference = tfm.fused_attention

  def fake_cudnn(q, k, v, mask, *, implementation):
    calls.append(implementation)
    return reference(q, k, v, mask, implementation="xla")

  monkeypatch.setattr(tfm, "fused_attention", fake_cudnn)
  return calls


def test_model_with_fused_attention_matches_xla(monkeypatch):
  """attention_impl='cudnn' routes full-sequence attention through ``fused_attention`` (here
  JAX's reference of the same call) and gives the same logits and gradients as 'xla'; cached
  decoding keeps the einsum path."""
  calls = _record_fused_calls(monkeypatch)
  fused, plain = _model("cudnn"), _model("xla")
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 101)
  seg = jnp.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])

  def loss(model):
    return jnp.mean(model(tokens, segment_ids_BxT=seg).astype(jnp.float32) ** 2)

  l_f, g_f = nnx.value_and_grad(loss)(fused)
  l_p, g_p = nnx.value_and_grad(loss)(plain)
  assert calls and set(calls) == {"cudnn"}
  np.testing.assert_allclose(l_f, l_p, rtol=2e-2)
  flat_f, flat_p = jax.tree.leaves(nnx.state(g_f)), jax.tree.leaves(nnx.state(g_p))
  for a, b in zip(flat_f, flat_p):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=5e-2, atol=5e-3)
  n = len(calls)
  cache = tfm.KVCache.zeros(fused.config, 2, 12)
  fused.decode(tokens[:, :3], jnp.broadcast_to(jnp.arange(3), (2, 3)), cache)
  assert len(calls) == n  # the cached path never calls the fused kernel


def test_cudnn_needs_gpu_and_half_precision():
  with pytest.raises(ConfigError, match="attention_impl='cudnn' needs dtype bfloat16"):
    tiny_config(attention_impl="cudnn")  # float32 compute
  with pytest.raises(ConfigError, match="attention_impl='flash'"):
    tiny_config(attention_impl="flash")
  if jax.default_backend() != "gpu":
    model = _model("cudnn")
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
      model(jnp.zeros((1, 4), jnp.int32))


def _pretend_one_gpu(monkeypatch, capability="9.0", platform="PJRT C API\ncuda 12080"):
  """JAX as if on one NVIDIA GPU of ``capability`` (H100 / H200: 9.0)."""
  client = type("Client", (), {"platform_version": platform})()
  device = type("Device", (), {"compute_capability": capability, "client": client})()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  monkeypatch.setattr(jax, "devices", lambda *a, **k: [device])


def test_auto_attention_takes_cudnn_only_on_one_gpu_for_shapes_it_takes(monkeypatch):
  """attention_impl='auto' (the default): cuDNN's flash attention on one NVIDIA GPU of compute
  capability >= 8.0 in bf16 / f16 with a head dim of 8..128 in steps of 8 and an even sequence
  length; XLA for everything else (CPU, several GPUs, a V100, ROCm, float32, odd lengths)."""
  assert tiny_config().attention_impl == "auto"
  impl = tfm.full_attention_impl
  for name in ("xla", "cudnn"):
    assert impl(name, "float32", 7, 3) == name  # explicit choices are kept
  _pretend_one_gpu(monkeypatch)
  assert impl("auto", "bfloat16", 64, 2048) == "cudnn"
  assert impl("auto", "float16", 128, 10) == "cudnn"
  for dtype, head_dim, seq in (("float32", 64, 2048), ("bfloat16", 60, 2048),
                               ("bfloat16", 256, 2048), ("bfloat16", 64, 2047)):
    assert impl("auto", dtype, head_dim, seq) == "xla", (dtype, head_dim, seq)
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  assert impl("auto", "bfloat16", 64, 2048) == "xla"
  for capability, platform in (("7.0", "cuda 12080"), ("9.0", "rocm 60300")):  # V100; ROCm
    _pretend_one_gpu(monkeypatch, capability, platform)
    assert impl("auto", "bfloat16", 64, 2048) == "xla", (capability, platform)
  _pretend_one_gpu(monkeypatch)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert impl("auto", "bfloat16", 64, 2048) == "xla"


def test_auto_attention_routes_the_model_through_the_fused_call_on_a_gpu(monkeypatch):
  """The model resolves 'auto' per call: on a (pretended) single GPU in bf16 an even-length
  forward goes through ``fused_attention`` and gives the same logits as 'xla'; an odd length
  stays on the einsum."""
  calls = _record_fused_calls(monkeypatch)
  auto, plain = _model("auto"), _model("xla")
  _pretend_one_gpu(monkeypatch)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 101)
  np.testing.assert_allclose(np.asarray(auto(tokens), np.float32),
                             np.asarray(plain(tokens), np.float32), rtol=2e-2, atol=2e-2)
  assert calls and set(calls) == {"cudnn"}
  n = len(calls)
  auto(tokens[:, :9])
  assert len(calls) == n  # odd length: the einsum


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(policy):
  """Rematerialised blocks compute the same function: loss and gradients match remat='none', and
  the policy really is applied (the backward pass recomputes: more ops in the jaxpr)."""
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 101)
  seg = jnp.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])

  def loss(model):
    return jnp.mean(model(tokens, segment_ids_BxT=seg) ** 2)

  base = Transformer(tiny_config(), rngs=nnx.Rngs(0))
  remat = Transformer(tiny_config(remat=policy), rngs=nnx.Rngs(0))
  l0, g0 = nnx.value_and_grad(loss)(base)
  l1, g1 = nnx.value_and_grad(loss)(remat)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g0))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jaxpr = str(jax.make_jaxpr(lambda m: nnx.grad(loss)(m))(remat))
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  assert "checkpoint" not in str(jax.make_jaxpr(lambda m: nnx.grad(loss)(m))(base))
  with pytest.raises(ConfigError, match="remat='some'"):
    tiny_config(remat="some")


def test_remat_reduces_activation_memory():
  """XLA's buffer assignment for a gradient of 8 blocks at T = 256: remat='full' keeps only the
  blocks' inputs (measured: 155 MiB of temporaries without remat, 29 MiB with)."""
  def temp_bytes(remat):
    cfg = tiny_config(num_hidden_layers=8, hidden_size=128, intermediate_size=512,
                      max_position_embeddings=1024, remat=remat)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((4, 256), jnp.int32)
    loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes("full") < 0.5 * temp_bytes("none")


def test_job_config_options_reach_the_model_and_fail_early():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from postrl.trainers.common import model_kwargs  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(param_dtype="float32", dtype="bfloat16", remat="dots"))
  assert model_kwargs(config) == dict(param_dtype="float32", dtype="bfloat16",
                                      attention_impl="auto", remat="dots",
                                      decode_attention_impl="auto", decode_block_impl="auto")
  config.decode_attention_impl = "pallas"
  config.decode_block_impl = "pallas"
  assert model_kwargs(config)["decode_attention_impl"] == "pallas"
  assert model_kwargs(config)["decode_block_impl"] == "pallas"
  del config["decode_attention_impl"], config["decode_block_impl"]
  if jax.default_backend() != "gpu":
    config.attention_impl = "cudnn"
    with pytest.raises(ConfigError, match=r"config.attention_impl='cudnn' needs an NVIDIA GPU"):
      model_kwargs(config)
