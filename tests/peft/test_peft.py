"""PEFT transforms on a tiny model: LoRA / DoRA / QLoRA / prompt / prefix tuning."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from postrl import peft
from postrl.models import KVCache, Transformer
from postrl.models.transformer import apply_rope, rope_inv_freq
from postrl.quant import dequantize_model, quantize_model
from postrl.trainers.step import OptimizerConfig, init_train_state, make_optimizer, train_step
from tests.conftest import tiny_config

QV = r"self_attn\.(q|v)_proj"


def _model(seed=0, **over):
  return Transformer(tiny_config(**over), rngs=nnx.Rngs(seed))


def _tokens(b=2, t=7, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(3, 101, (b, t)), jnp.int32)


def _randomise_adapters(model, seed=1, scale=0.3):
  """Non-zero B (and a perturbed magnitude) so that the adapters change the outputs."""
  state = nnx.state(model, peft.AdapterParam)
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  state = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype),
                       state)
  nnx.update(model, state)


def test_lora_at_init_is_the_base_and_has_the_right_shapes():
  model = _model()
  tok = _tokens()
  base = model(tok)
  peft.apply_lora(model, rank=4, alpha=8, targets=QV)
  np.testing.assert_array_equal(model(tok), base)
  layers = peft.lora_layers(model)
  assert sorted(layers) == [f"layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
  q = layers["layers.0.self_attn.q_proj"].lora
  assert q.a.shape == (64, 4) and q.b.shape == (4, 64) and q.scale == 2.0
  assert not np.any(np.asarray(q.b[...])) and np.any(np.asarray(q.a[...]))


def test_lora_output_is_x_w_plus_alpha_over_r_x_a_b():
  model = _model()
  peft.apply_lora(model, rank=2, alpha=6, targets=r"layers\.0\.mlp\.up_proj")
  _randomise_adapters(model)
  lin = model.layers[0].mlp.up_proj
  x = jax.random.normal(jax.random.key(3), (3, 64))
  want = x @ lin.kernel[...] + (6 / 2) * (x @ lin.lora.a[...]) @ lin.lora.b[...]
  np.testing.assert_allclose(lin(x), want, rtol=1e-5, atol=1e-5)


def test_merged_equals_unmerged_and_unmerge_restores():
  model = _model()
  peft.apply_lora(model, rank=4, alpha=16, targets=r"(q|k|v|o|gate|up|down)_proj")
  _randomise_adapters(model)
  tok = _tokens()
  kernel0 = np.asarray(model.layers[1].mlp.down_proj.kernel[...]).copy()
  adapted = model(tok)
  peft.merge_lora(model)
  assert not np.allclose(model.layers[1].mlp.down_proj.kernel[...], kernel0)
  np.testing.assert_allclose(model(tok), adapted, rtol=1e-4, atol=1e-4)
  peft.unmerge_lora(model)
  np.testing.assert_allclose(model.layers[1].mlp.down_proj.kernel[...], kernel0, atol=1e-6)
  np.testing.assert_allclose(model(tok), adapted, rtol=1e-4, atol=1e-4)
  plain = peft.merged_model(model)
  assert not peft.lora_layers(plain) and peft.lora_layers(model)
  np.testing.assert_allclose(plain(tok), adapted, rtol=1e-4, atol=1e-4)


def _sft_like_loss(graphdef):
  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch["tokens"][:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1).mean(), {}
  return loss_fn


def _opt_elements(state):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state)
             if hasattr(x, "shape") and x.ndim > 0)


def test_only_adapters_get_gradients_and_optimizer_state():
  tok = _tokens(4, 9)
  tx = make_optimizer(OptimizerConfig(lr=1e-2, total_steps=10))
  full = _model()
  g_full, p_full = nnx.split(full)
  full_state = init_train_state(p_full, tx, jax.random.key(0))
  model = _model()
  peft.apply_lora(model, rank=4, alpha=8, targets=QV)
  graphdef, trainable, frozen = peft.split_trainable(model)
  state = init_train_state(trainable, tx, jax.random.key(0))
  n_adapter = peft.num_elements(trainable)
  assert n_adapter == 2 * (64 * 4 + 4 * 64 + 64 * 4 + 4 * 32)
  # Adam keeps two moments per trainable element, nothing for the frozen base
  assert _opt_elements(state) == 2 * n_adapter
  assert _opt_elements(full_state) == 2 * peft.num_elements(p_full) > 20 * _opt_elements(state)
  frozen_before = jax.tree.map(np.array, frozen)
  new, metrics = jax.jit(lambda s, b, f: train_step(
      _sft_like_loss(graphdef), tx, s, b, frozen=f, combine=peft.combine))(
          state, {"tokens": tok}, frozen)
  assert float(metrics["optim/grad_norm"]) > 0
  # B moved away from zero (it is where the gradient lands first); the base is untouched
  b = new.params["layers"][0]["self_attn"]["q_proj"]["lora"]["b"][...]
  assert np.any(np.asarray(b))
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen))
  loss0 = _sft_like_loss(graphdef)(peft.combine(trainable, frozen), {"tokens": tok})[0]
  for _ in range(5):
    new, _ = train_step(_sft_like_loss(graphdef), tx, new, {"tokens": tok}, frozen=frozen,
                        combine=peft.combine)
  assert _sft_like_loss(graphdef)(peft.combine(new.params, frozen), {"tokens": tok})[0] < loss0


def test_qlora_base_is_nf4_and_close_to_lora_on_the_dequantised_base():
  tok = _tokens()
  q = _model(hidden_size=128, intermediate_size=128)
  peft.apply_qlora(q, quant="nf4_dq", rank=4, alpha=8, targets=QV)
  _randomise_adapters(q)
  lin = q.layers[0].self_attn.q_proj
  assert lin.quantized and lin.kernel.spec.kind == "nf4"
  _, trainable, frozen = peft.split_trainable(q)
  assert all(isinstance(v, peft.AdapterParam) for _, v in nnx.to_flat_state(trainable))
  assert not any(isinstance(v, peft.AdapterParam) for _, v in nnx.to_flat_state(frozen))
  # the same adapters on the dequantised base give the same function
  ref = dequantize_model(nnx.clone(q))
  assert not ref.layers[0].self_attn.q_proj.quantized
  np.testing.assert_allclose(q(tok), ref(tok), rtol=1e-4, atol=1e-4)
  # and the quantized base stays close to the float one it came from
  f = _model(hidden_size=128, intermediate_size=128)
  peft.apply_lora(f, rank=4, alpha=8, targets=QV)
  nnx.update(f, nnx.state(q, peft.AdapterParam))
  err = float(jnp.abs(q(tok) - f(tok)).max() / jnp.abs(f(tok)).max())
  assert 0 < err < 0.25  # NF4 on random N(0, 0.02) kernels: ~10% per weight
  # export = dequantise + merge
  np.testing.assert_allclose(peft.merged_model(q)(tok), q(tok), rtol=1e-4, atol=1e-4)
  # a training step: moments only for the adapters, the NF4 storage unchanged
  graphdef, trainable, frozen = peft.split_trainable(q)
  tx = make_optimizer(OptimizerConfig(lr=1e-2, total_steps=10))
  state = init_train_state(trainable, tx, jax.random.key(0))
  assert _opt_elements(state) == 2 * peft.num_elements(trainable)
  codes = np.array(frozen["layers"][0]["self_attn"]["q_proj"]["kernel"]["w_q"][...])
  new, metrics = train_step(_sft_like_loss(graphdef), tx, state, {"tokens": _tokens(2, 9)},
                            frozen=frozen, combine=peft.combine)
  assert float(metrics["optim/grad_norm"]) > 0
  np.testing.assert_array_equal(frozen["layers"][0]["self_attn"]["q_proj"]["kernel"]["w_q"][...],
                                codes)


def test_dora_at_init_is_the_base_and_merges():
  model = _model()
  tok = _tokens()
  base = model(tok)
  peft.apply_dora(model, rank=4, alpha=8, targets=r"(q|v|up)_proj")
  np.testing.assert_allclose(model(tok), base, rtol=1e-5, atol=1e-5)
  lin = model.layers[0].mlp.up_proj
  np.testing.assert_allclose(lin.lora.magnitude[...],
                             np.linalg.norm(np.asarray(lin.kernel[...]), axis=0), rtol=1e-6)
  _randomise_adapters(model)
  x = jax.random.normal(jax.random.key(5), (3, 64))
  v = lin.kernel[...] + lin.lora.scale * lin.lora.a[...] @ lin.lora.b[...]
  w_prime = lin.lora.magnitude[...] * v / jnp.linalg.norm(v, axis=0)  # norm over K, per column
  np.testing.assert_allclose(lin(x), x @ w_prime, rtol=1e-4, atol=1e-4)
  adapted = model(tok)
  np.testing.assert_allclose(peft.merged_model(model)(tok), adapted, rtol=1e-4, atol=1e-4)
  peft.merge_lora(model)
  with pytest.raises(peft.PEFTError, match="DoRA"):
    peft.unmerge_lora(model)


def test_prompt_tuning_equals_the_base_fed_the_virtual_tokens_first():
  model = _model()
  tok = _tokens(2, 6)
  ids = jnp.asarray([5, 17, 42], jnp.int32)
  base_full = model(jnp.concatenate([jnp.broadcast_to(ids, (2, 3)), tok], axis=1))
  peft.apply_prompt_tuning(model, num_virtual_tokens=3)
  model.prompt.embeddings.set_value(model.embed_tokens[...][ids])
  np.testing.assert_allclose(model(tok), base_full[:, 3:], rtol=1e-4, atol=1e-4)
  # packed rows: every segment sees the virtual tokens before its own tokens
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2]] * 2)
  packed = model(tok, segment_ids_BxT=seg)
  second = model(tok[:, 3:])
  np.testing.assert_allclose(packed[:, 3:], second, rtol=1e-4, atol=1e-4)
  _check_cached_decode_matches(model, tok)


def _check_cached_decode_matches(model, tok):
  """Prefill 4 tokens into a KV cache then decode 2 one by one == the uncached forward."""
  full = model(tok)
  cache = KVCache.zeros(model.config, tok.shape[0], 8)
  pos = jnp.broadcast_to(jnp.arange(6), tok.shape)
  out, cache = model.decode(tok[:, :4], pos[:, :4], cache)
  np.testing.assert_allclose(out, full[:, :4], rtol=1e-4, atol=1e-4)
  for t in (4, 5):
    out, cache = model.decode(tok[:, t:t + 1], pos[:, t:t + 1], cache)
    np.testing.assert_allclose(out[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


def test_prefix_tuning_attends_the_prefix_and_decodes_with_a_cache():
  model = _model()
  tok = _tokens(2, 6)
  base = model(tok)
  peft.apply_prefix_tuning(model, num_virtual_tokens=4)
  pk = model.layers[0].self_attn.prefix
  assert pk.k.shape == (4, 2, 16) and pk.v.shape == (4, 2, 16)
  adapted = model(tok)
  assert not np.allclose(adapted, base, atol=1e-3)
  # zero values and very negative-scoring keys: the prefix carries no weight -> the base model
  for layer in model.layers:
    layer.self_attn.prefix.v.set_value(jnp.zeros((4, 2, 16)))
  out_zero_v = model(tok)
  assert not np.allclose(out_zero_v, base, atol=1e-3)  # softmax mass still goes to the prefix
  _check_cached_decode_matches(model, tok)
  with pytest.raises(peft.PEFTError, match="virtual tokens"):
    peft.merged_model(model)


def test_prefix_with_one_key_per_query_equals_manual_attention():
  """One layer, prefix of 1: attention over [prefix; sequence] computed by hand."""
  model = _model(num_hidden_layers=1)
  peft.apply_prefix_tuning(model, num_virtual_tokens=1)
  attn = model.layers[0].self_attn
  x = jax.random.normal(jax.random.key(0), (1, 3, 64))
  pos = jnp.arange(3)[None]
  mask = jnp.tril(jnp.ones((3, 3), bool))[None]
  inv = rope_inv_freq(model.config)
  out, _ = attn(x, pos, mask, inv)
  q = apply_rope((x @ attn.q_proj.kernel[...]).reshape(1, 3, 4, 16), pos, inv)
  k = apply_rope((x @ attn.k_proj.kernel[...]).reshape(1, 3, 2, 16), pos, inv)
  v = (x @ attn.v_proj.kernel[...]).reshape(1, 3, 2, 16)
  k = jnp.concatenate([attn.prefix.k[...][None], k], 1)
  v = jnp.concatenate([attn.prefix.v[...][None], v], 1)
  heads = []
  for h in range(4):
    kv = h // 2
    s = q[0, :, h] @ k[0, :, kv].T / 4.0
    allowed = np.concatenate([np.ones((3, 1), bool), np.tril(np.ones((3, 3), bool))], 1)
    s = jnp.where(allowed, s, -1e30)
    heads.append(jax.nn.softmax(s, -1) @ v[0, :, kv])
  want = jnp.concatenate(heads, -1) @ attn.o_proj.kernel[...]
  np.testing.assert_allclose(out[0], want, rtol=1e-4, atol=1e-4)


def test_lora_dropout_only_in_training_steps():
  model = _model()
  peft.apply_lora(model, rank=4, alpha=8, targets=QV, dropout=0.5)
  _randomise_adapters(model)
  tok = _tokens()
  graphdef, trainable, frozen = peft.split_trainable(model)
  evals = [nnx.merge(graphdef, peft.combine(trainable, frozen))(tok) for _ in range(2)]
  np.testing.assert_array_equal(evals[0], evals[1])
  a = nnx.merge(graphdef, peft.combine(trainable, frozen, jax.random.key(1)))(tok)
  b = nnx.merge(graphdef, peft.combine(trainable, frozen, jax.random.key(2)))(tok)
  assert not np.allclose(a, evals[0]) and not np.allclose(a, b)
  # the expectation of the dropped-out adapter input is the input (inverted dropout)
  lin = nnx.merge(graphdef, peft.combine(trainable, frozen, jax.random.key(3))).layers[0]
  x = jnp.ones((4000, 64))
  drop = lin.self_attn.q_proj.lora._dropout(x)  # pylint: disable=protected-access
  assert set(np.unique(np.asarray(drop))) == {0.0, 2.0}
  assert abs(float(drop.mean()) - 1.0) < 0.02


def test_adapters_save_and_load_roundtrip(tmp_path):
  model = _model()
  cfg = ml_collections.ConfigDict(dict(method="lora", rank=4, alpha=8.0, targets=QV))
  peft.apply_peft(model, cfg)
  _randomise_adapters(model)
  tok = _tokens()
  peft.save_adapters(model, str(tmp_path), cfg)
  assert (tmp_path / "adapter_config.json").exists()
  fresh = peft.load_adapters(_model(), str(tmp_path))
  np.testing.assert_allclose(fresh(tok), model(tok), rtol=1e-6)


def test_digest_changes_with_the_base():
  a, b = _model(0), _model(1)
  for m in (a, b):
    peft.apply_lora(m, rank=2, alpha=2, targets=QV)
  da, db = (peft.base_digest(peft.split_trainable(m)[2]) for m in (a, b))
  assert da != db and da == peft.base_digest(peft.split_trainable(a)[2])


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=4, alpha=8, targets=r"attn\.qq_proj"), re.escape(r"'attn\.qq_proj' matches no")),
    (dict(rank=0, alpha=8, targets=QV), "rank"),
    (dict(rank=-2, alpha=8, targets=QV), "rank"),
    (dict(rank=4, alpha=0, targets=QV), "alpha"),
    (dict(rank=4, alpha=8, targets="(", ), "not a valid regex"),
    (dict(rank=4, alpha=8, targets=QV, dropout=1.0), "dropout"),
])
def test_bad_lora_settings_name_the_problem(kwargs, message):
  with pytest.raises(peft.PEFTError, match=message):
    peft.apply_lora(_model(), **kwargs)


def test_unknown_method_and_bad_virtual_tokens():
  with pytest.raises(peft.PEFTError, match="unknown method 'lorra'"):
    peft.apply_peft(_model(), ml_collections.ConfigDict(dict(method="lorra")))
  with pytest.raises(peft.PEFTError, match="num_virtual_tokens"):
    peft.apply_peft(_model(), ml_collections.ConfigDict(dict(method="prompt",
                                                              num_virtual_tokens=0)))


def test_optimizer_state_follows_the_trainable_tree_only():
  """optax state leaves mirror the trainable params: the frozen base has no moments at all."""
  model = _model()
  peft.apply_lora(model, rank=2, alpha=4, targets=QV)
  _, trainable, _ = peft.split_trainable(model)
  opt = optax.adam(1e-3).init(trainable)
  assert peft.num_elements(opt) == 2 * peft.num_elements(trainable) + 1  # mu, nu, count


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_merged_export_loads_in_transformers_with_the_same_logits(tmp_path, method):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from postrl.models import save_pretrained  # pylint: disable=import-outside-toplevel
  model = _model(hidden_size=128, intermediate_size=128, tie_word_embeddings=False)
  peft.apply_peft(model, ml_collections.ConfigDict(dict(method=method, rank=4, alpha=8.0,
                                                        targets=r"(q|v|down)_proj")))
  _randomise_adapters(model, scale=0.1)
  tok = _tokens(2, 9)
  adapted = np.asarray(model(tok))
  save_pretrained(peft.merged_model(model), str(tmp_path))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    ref = hf(torch.tensor(np.asarray(tok))).logits.numpy()
  np.testing.assert_allclose(ref, adapted, rtol=1e-4, atol=1e-4)
