"""Mesh construction, logical-axis rules, sharded init, and a sharded step == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from postrl import sharding
from postrl.logprobs import model_apply_fn, token_logps
from postrl.models import Transformer
from postrl.trainers.step import (OptimizerConfig, TrainState, init_train_state, loss_and_grads,
                                  make_optimizer, make_train_step)
from tests.conftest import tiny_config

CFG = tiny_config(vocab_size=128)


def test_make_mesh_fills_minus_one():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2), ("tensor", 1)])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("axes,message", [
    ([("data", 3), ("fsdp", -1)], "not divisible"),
    ([("data", 2), ("fsdp", 2)], "needs 4 devices"),
    ([("data", -1), ("fsdp", -1)], "at most one"),
    ([("data", 2), ("data", 4)], "distinct"),
])
def test_make_mesh_errors(axes, message):
  with pytest.raises(sharding.ShardingError, match=message):
    sharding.make_mesh(axes)


@pytest.mark.parametrize("axes,message", [
    # 2.5 was truncated to 2, True read as 1
    ([("data", 2.5), ("fsdp", -1)], "'data': the size must be an integer"),
    ([("data", 2.0), ("fsdp", -1)], "'data': the size must be an integer"),
    ([("data", None)], "'data': the size must be an integer"),
    ([("data", float("nan"))], "'data': the size must be an integer"),
    ([("data", True), ("fsdp", -1)], "'data': the size must be an integer"),
    ([("data", 8, 1)], "list of \\(name, size\\) pairs"),
    ({"data": 8}, "list of \\(name, size\\) pairs"),
    ("data", "list of \\(name, size\\) pairs"),
    ([(None, 8)], "names must be non-empty strings"),
    # a typo replicates everything over the axis: every device of it does the same work
    ([("data", 2), ("tensr", 4)], "'tensr' \\(size 4\\) is in no sharding rule"),
])
def test_make_mesh_refuses_bad_specs(axes, message):
  with pytest.raises(sharding.ShardingError, match=message):
    sharding.make_mesh(axes)


def test_make_mesh_devices_and_rules():
  with pytest.raises(sharding.ShardingError, match="no devices"):
    sharding.make_mesh([("data", -1)], devices=[])  # was a mesh of size 0
  with pytest.raises(sharding.ShardingError, match="more than once"):
    sharding.make_mesh([("data", 2)], devices=[jax.devices()[0]] * 2)
  # an axis of size 1 outside the rules is harmless; rules=None allows any names
  assert dict(sharding.make_mesh([("data", -1), ("extra", 1)]).shape) == {"data": 8, "extra": 1}
  assert dict(sharding.make_mesh([("x", 2), ("y", -1)], rules=None).shape) == {"x": 2, "y": 4}


def test_logical_names_must_match_the_rank():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  # zip() used to drop the extra name or leave the extra dimension unnamed
  for names in (("embed",), ("embed", "mlp", "vocab")):
    with pytest.raises(sharding.ShardingError,
                       match="do not match an array of shape \\(64, 96\\)"):
      sharding.logical_to_spec(names, (64, 96), mesh)
  params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))[1]
  q = params["layers"][0]["self_attn"]["q_proj"]["kernel"]
  q.set_metadata("sharding_names", ("embed",))
  with pytest.raises(sharding.ShardingError, match="q_proj.*kernel.*\\('embed',\\) do not match"):
    sharding.state_shardings(params, mesh)


def test_put_batch_rows_must_split_over_the_batch_shards():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  ok = sharding.put_batch({"tokens": np.zeros((8, 3), np.int32)}, mesh)
  assert ok["tokens"].shape == (8, 3)
  with pytest.raises(sharding.ShardingError,
                     match="batch\\['mask'\\] of shape \\(6, 3\\).*4 batch shards"):
    sharding.put_batch({"tokens": np.zeros((8, 3), np.int32), "mask": np.ones((6, 3))}, mesh)
  with pytest.raises(sharding.ShardingError, match="batch\\['n'\\] of shape \\(\\)"):
    sharding.put_batch({"n": np.float32(3)}, mesh)


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("vocab", "embed"), (128, 64), mesh) == P("tensor", "fsdp")
  # a dimension the mesh axis does not divide stays replicated
  assert sharding.logical_to_spec(("vocab", "embed"), (101, 64), mesh) == P(None, "fsdp")
  assert sharding.logical_to_spec(("norm",), (64,), mesh) == P(None)
  # a mesh axis is used once per array
  assert sharding.logical_to_spec(("mlp", "mlp"), (8, 8), mesh) == P("tensor", None)
  with pytest.raises(sharding.ShardingError, match="no sharding rule for logical axis 'heads'"):
    sharding.logical_to_spec(("heads",), (8,), mesh)


def _sft_loss(apply_fn):
  def loss_fn(params, batch):
    logps = token_logps(apply_fn, params, batch["tokens"], batch["loss_mask"],
                        segment_ids_BxT=batch["segment_ids"])
    n = batch["loss_mask"].sum()
    return -logps.sum() / n, {"loss_weight": n, "tokens": n}
  return loss_fn


def _batch(B=8, T=16, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, CFG.vocab_size, (B, T)).astype(np.int32)
  lengths = rng.randint(T // 2, T + 1, B)
  seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  mask = seg * (np.arange(T)[None] >= 4)
  return dict(tokens=tokens, segment_ids=seg, loss_mask=mask.astype(np.int32))


def _init(mesh):
  graphdef = nnx.graphdef(Transformer(CFG, rngs=nnx.Rngs(0)))
  tx = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=2, total_steps=10))

  def init():
    params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))[1]
    return init_train_state(params, tx, jax.random.key(1))

  def shardings_fn(abstract):
    params = sharding.state_shardings(abstract.params, mesh)
    return TrainState(step=sharding.NamedSharding(mesh, P()), params=params,
                      opt_state=sharding.optimizer_shardings(tx, params, abstract.opt_state, mesh),
                      rng=sharding.NamedSharding(mesh, P()))

  state, shardings = sharding.sharded_init(init, shardings_fn)
  return graphdef, tx, state, shardings


def test_sharded_init_places_params_by_rules():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  _, _, state, _ = _init(mesh)
  q = state.params["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P("fsdp", "tensor")
  # a device holds a quarter of the matrix, and Adam's moments are sharded the same way
  assert q.addressable_shards[0].data.shape == (32, 32)
  mu = state.opt_state[1][0].mu["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert mu.sharding.spec == P("fsdp", "tensor")
  assert state.params["embed_tokens"].sharding.spec == P("tensor", "fsdp")


def test_optimizer_shardings_under_optax_masked():
  """Frozen parameters (``optax.masked``, as PEFT and frozen teachers use) keep no Adam state; the
  trainable ones' moments follow their parameters' shardings."""
  import optax  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))[1]
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, _: "q_proj" in jax.tree_util.keystr(path), params)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.masked(optax.adamw(1e-3), trainable))

  def init():
    p = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))[1]
    return p, tx.init(p)

  def shardings_fn(abstract):
    p = sharding.state_shardings(abstract[0], mesh)
    return p, sharding.optimizer_shardings(tx, p, abstract[1], mesh)

  (params, opt_state), _ = sharding.sharded_init(init, shardings_fn)
  mu = opt_state[1].inner_state[0].mu
  q = mu["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P("fsdp", "tensor") and q.shape == (64, 64)
  value = lambda v: getattr(v, "value", v)  # nnx.State wraps each leaf in its Variable
  assert isinstance(value(mu["layers"][0]["self_attn"]["k_proj"]["kernel"]), optax.MaskedNode)
  assert isinstance(value(mu["embed_tokens"]), optax.MaskedNode)
  n_state = sum(x.size for x in jax.tree.leaves(mu))
  n_q = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
            if "q_proj" in jax.tree_util.keystr(p))
  assert n_state == n_q  # optimizer memory only for the trainable parameters


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_sharded_step_equals_one_device(accum_steps):
  mesh1 = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
  mesh8 = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  batch = _batch()
  out = {}
  for name, mesh in [("one", mesh1), ("mesh", mesh8)]:
    graphdef, tx, state, shardings = _init(mesh)
    loss_fn = _sft_loss(model_apply_fn(graphdef))
    glob = sharding.put_batch(batch, mesh)
    loss, _, grads, _ = jax.jit(lambda p, b: loss_and_grads(loss_fn, p, b, jax.random.key(0)))(
        state.params, glob)
    step = make_train_step(loss_fn, tx, state_shardings=shardings, accum_steps=accum_steps,
                           batch_sharding=sharding.batch_sharding(mesh), mesh=mesh)
    new_state, metrics = step(state, glob)
    out[name] = (float(loss), jax.device_get(grads), jax.device_get(new_state.params),
                 float(metrics["loss"]))
    if name == "mesh":
      assert new_state.params["layers"][1]["mlp"]["up_proj"]["kernel"].sharding.spec == P(
          "fsdp", "tensor")
  np.testing.assert_allclose(out["mesh"][0], out["one"][0], rtol=1e-5)
  np.testing.assert_allclose(out["mesh"][3], out["one"][3], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out["mesh"][1]), jax.tree.leaves(out["one"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
  for a, b in zip(jax.tree.leaves(out["mesh"][2]), jax.tree.leaves(out["one"][2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
