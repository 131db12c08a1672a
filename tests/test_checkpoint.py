"""Checkpointer: sharded bitwise round trips, pruning, checks on restore, crash safety, signals."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from postrl.checkpoint import Checkpointer, CheckpointError, PreemptionGuard, should_stop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh():
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def _state(mesh, scale=1):
  """float32 / bfloat16 / int32 / uint32 leaves in a nested tree, some sharded on 8 devices."""
  x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32) * scale
  s2 = NamedSharding(mesh, P("data", "model"))
  s1 = NamedSharding(mesh, P("data", None))
  return {
      "params": {"layers": [{"kernel": jax.device_put(x, s2)},
                            {"kernel": jax.device_put(x.astype(jnp.bfloat16), s1)}],
                 "bias": jnp.arange(8, dtype=jnp.float32) / 3},
      "step": jnp.int32(7 * scale),
      "rng": jax.random.key_data(jax.random.key(scale)),  # uint32 raw key data
  }


def _abstract(state):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def test_round_trip_bitwise_with_shardings(tmp_path):
  mesh = _mesh()
  state = _state(mesh)
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=10)
  assert ckpt.latest_step() is None
  assert ckpt.save(10, state, {"data": {"pos": 123}, "note": "x"})
  ckpt.wait()
  assert ckpt.latest_step() == 10

  # Ask for a different sharding of one leaf than it was saved with: restore follows the request.
  abstract = _abstract(state)
  other = NamedSharding(mesh, P(None, "data"))
  abstract["params"]["layers"][0]["kernel"] = jax.ShapeDtypeStruct((16, 8), jnp.float32,
                                                                   sharding=other)
  restored, extra = Checkpointer(tmp_path / "ckpt", save_every=10).restore(None, abstract)
  assert extra == {"data": {"pos": 123}, "note": "x"}
  flat_r, tree_r = jax.tree.flatten(restored)
  flat_s, tree_s = jax.tree.flatten(state)
  flat_a = jax.tree.leaves(abstract)
  assert tree_r == tree_s
  for r, s, a in zip(flat_r, flat_s, flat_a):
    assert r.dtype == s.dtype and r.shape == s.shape
    assert r.sharding == a.sharding
    assert np.asarray(r).tobytes() == np.asarray(s).tobytes()
  assert restored["params"]["layers"][0]["kernel"].sharding == other
  ckpt.close()


def test_nnx_state_and_optax_state_round_trip(tmp_path):
  """nnx.State (Variable nodes), optax namedtuples and empty nodes: the trees a trainer stores."""
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  mesh = _mesh()

  def init():
    params = nnx.state(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), nnx.Param)
    return {"params": params, "opt": optax.adamw(1e-3).init(params), "step": jnp.int32(0)}

  sharding = NamedSharding(mesh, P())
  state = jax.jit(init, out_shardings=sharding)()
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state, {})
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          jax.eval_shape(init))
  restored, _ = Checkpointer(tmp_path, save_every=1).restore(1, abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(r), np.asarray(s))
  msg = r"opt/0/mu/bias/value has shape \(4,\) in the checkpoint but \(5,\)"
  with pytest.raises(CheckpointError, match=msg):
    bad = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                       jax.eval_shape(lambda: {**init(), "opt": optax.adamw(1e-3).init(
                           nnx.state(nnx.Linear(8, 5, rngs=nnx.Rngs(0)), nnx.Param))}))
    Checkpointer(tmp_path, save_every=1).restore(1, bad)


def test_keep_prunes_and_save_every(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=2, keep=2)
  state = {"w": jnp.zeros(3)}
  saved = [s for s in range(1, 9) if ckpt.save(s, state, {"s": s})]
  assert saved == [2, 4, 6, 8]
  assert not ckpt.should_save(3) and ckpt.should_save(4)
  assert ckpt.save(9, state, {}, force=True)  # e.g. the final step or a preemption
  assert not ckpt.save(9, state, {}, force=True)  # already saved: not written twice
  ckpt.close()
  assert ckpt.all_steps() == [8, 9]
  assert sorted(os.listdir(tmp_path)) == ["8", "9"]


def test_restore_latest_and_explicit_step(tmp_path):
  with Checkpointer(tmp_path, save_every=1, keep=None) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, {"w": jnp.full((2,), s, jnp.int32)}, {"s": s})
  ckpt = Checkpointer(tmp_path, save_every=1)
  abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.int32)}  # no sharding: device 0 on one process
  state, extra = ckpt.restore(None, abstract)
  assert extra == {"s": 3} and state["w"].tolist() == [3, 3]
  state, extra = ckpt.restore(2, abstract)
  assert extra == {"s": 2} and state["w"].tolist() == [2, 2]
  with pytest.raises(CheckpointError, match=r"no checkpoint at step 5 \(saved steps: \[1, 2, 3\]"):
    ckpt.restore(5, abstract)
  with pytest.raises(CheckpointError, match="no checkpoint to restore"):
    Checkpointer(tmp_path / "empty", save_every=1).restore(None, abstract)


def test_fingerprint_mismatch_names_the_key(tmp_path):
  fp = {"model": {"hidden_size": 576, "layers": 30}, "optimizer": "adamw"}
  with Checkpointer(tmp_path, save_every=1, fingerprint=fp) as ckpt:
    ckpt.save(200, {"w": jnp.zeros(2)}, {})
  abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
  other = {"model": {"hidden_size": 64, "layers": 30}, "optimizer": "adamw"}
  with pytest.raises(CheckpointError) as e:
    Checkpointer(tmp_path, save_every=1, fingerprint=other).restore(None, abstract)
  msg = str(e.value)
  assert f"{tmp_path} step 200" in msg
  assert "fingerprint differs at 'model.hidden_size': 576 vs 64" in msg
  assert "new workdir" in msg
  with pytest.raises(CheckpointError, match="'optimizer': 'adamw' vs absent"):
    Checkpointer(tmp_path, save_every=1, fingerprint={"model": fp["model"]}).restore(None, abstract)
  state, _ = Checkpointer(tmp_path, save_every=1, fingerprint=fp).restore(None, abstract)
  assert state["w"].tolist() == [0, 0]


def test_tree_mismatch_names_the_path(tmp_path):
  state = {"params": {"layers": [{"attn": {"q": {"kernel": jnp.zeros((64, 64))}}}]},
           "step": jnp.int32(0)}
  with Checkpointer(tmp_path / "runs", save_every=1) as ckpt:
    ckpt.save(200, state, {})
  ckpt = Checkpointer(tmp_path / "runs", save_every=1)

  def abstract(shape=(64, 64), dtype=jnp.float32, extra_leaf=False, drop_step=False):
    a = {"params": {"layers": [{"attn": {"q": {"kernel": jax.ShapeDtypeStruct(shape, dtype)}}}]},
         "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if extra_leaf:
      a["params"]["layers"][0]["attn"]["k"] = {"kernel": jax.ShapeDtypeStruct(shape, dtype)}
    if drop_step:
      del a["step"]
    return a

  with pytest.raises(CheckpointError) as e:
    ckpt.restore(200, abstract(shape=(64, 128)))
  assert str(e.value).startswith(
      f"{tmp_path}/runs step 200: params/layers/0/attn/q/kernel has shape (64, 64) in the "
      "checkpoint but (64, 128) in this run.")
  with pytest.raises(CheckpointError, match="q/kernel has dtype float32 in the checkpoint but bf"):
    ckpt.restore(200, abstract(dtype=jnp.bfloat16))
  with pytest.raises(CheckpointError, match="attn/k/kernel is in this run but not in the checkp"):
    ckpt.restore(200, abstract(extra_leaf=True))
  with pytest.raises(CheckpointError, match="step is in the checkpoint but not in this run"):
    ckpt.restore(200, abstract(drop_step=True))


def test_typed_prng_keys_are_refused(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=1)
  with pytest.raises(TypeError, match="rng is a typed PRNG key.*key_data"):
    ckpt.save(1, {"rng": jax.random.key(0)}, {})
  with pytest.raises(TypeError, match="JSON-able"):
    ckpt.save(1, {"w": jnp.zeros(1)}, {"x": object()})
  assert ckpt.latest_step() is None


_CRASH_SCRIPT = textwrap.dedent("""
  import os, sys
  sys.path.insert(0, {repo!r})
  import jax.numpy as jnp
  from postrl.checkpoint import Checkpointer
  ckpt = Checkpointer({directory!r}, save_every=100)
  ckpt.save(100, {{"w": jnp.ones(4)}}, {{"s": 100}})
  ckpt.wait()
  rename = os.rename
  def crash(src, dst, *a, **k):  # die just before the step directory is renamed into place
    if os.path.basename(os.fspath(dst)) == "200":
      os._exit(17)
    return rename(src, dst, *a, **k)
  os.rename = crash
  ckpt.save(200, {{"w": jnp.full(4, 2.0)}}, {{"s": 200}})
  ckpt.wait()
  print("not crashed")
""")


def test_crash_mid_write_leaves_no_checkpoint(tmp_path):
  directory = str(tmp_path / "ckpt")
  script = _CRASH_SCRIPT.format(repo=REPO, directory=directory)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 17, proc.stderr[-2000:]
  assert "200.orbax-checkpoint-tmp" in os.listdir(directory)  # everything written but the rename

  ckpt = Checkpointer(directory, save_every=100)
  assert ckpt.latest_step() == 100
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  state, extra = ckpt.restore(None, abstract)
  assert extra == {"s": 100} and state["w"].tolist() == [1.0] * 4
  assert ckpt.save(200, {"w": jnp.full(4, 3.0)}, {"s": 200})  # the same step can be written again
  ckpt.wait()
  state, extra = ckpt.restore(None, abstract)
  assert extra == {"s": 200} and state["w"].tolist() == [3.0] * 4
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["100", "200"]  # orbax removed the partial write


def test_hand_made_tmp_dir_is_ignored(tmp_path):
  with Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, {"w": jnp.zeros(1)}, {})
  (tmp_path / "5.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
  assert Checkpointer(tmp_path, save_every=1).latest_step() == 1


def test_directory_in_the_way_is_a_checkpoint_error(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(CheckpointError, match="checkpoints: cannot create the checkpoint directory"):
    Checkpointer(tmp_path / "checkpoints", save_every=1)
  with pytest.raises(CheckpointError, match="cannot create"):  # a file where a parent should be
    Checkpointer(tmp_path / "checkpoints" / "sub", save_every=1)


def _damage(step_dir, how):
  if how == "extra":  # a JSON item cut short
    (step_dir / "extra" / "metadata").write_text('{"s": ')
  elif how == "state_item":  # the arrays' item gone
    shutil.rmtree(step_dir / "state")
  elif how == "array_data":  # the array bytes truncated, the metadata intact
    for f in (step_dir / "state").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        with open(f, "r+b") as fh:
          fh.truncate(8)


@pytest.mark.parametrize("how", ["extra", "state_item", "array_data"])
def test_damaged_checkpoint_names_the_step_and_the_way_back(tmp_path, how):
  """A truncated or missing file is a CheckpointError naming the step (not a json, KeyError or
  TensorStore trace); deleting that step, as it advises, resumes from the one before."""
  fp = {"model": "tiny"}
  with Checkpointer(tmp_path, save_every=1, fingerprint=fp) as ckpt:
    for s in (1, 2):
      ckpt.save(s, {"w": jnp.full((64,), s, jnp.float32)}, {"s": s})
  assert (tmp_path / "2" / "extra" / "metadata").exists()
  _damage(tmp_path / "2", how)
  abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32)}
  ckpt = Checkpointer(tmp_path, save_every=1, fingerprint=fp)
  with pytest.raises(CheckpointError, match=rf"{tmp_path} step 2 cannot be read .* delete "
                                            rf"{tmp_path}/2 .*saved steps: \[1, 2\]"):
    ckpt.restore(None, abstract)
  ckpt.close()
  shutil.rmtree(tmp_path / "2")
  state, extra = Checkpointer(tmp_path, save_every=1, fingerprint=fp).restore(None, abstract)
  assert extra == {"s": 1} and state["w"].tolist() == [1.0] * 64


def test_preemption_guard_sets_flag_and_restores_handler():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.requested and not should_stop(guard)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested and guard.signal == signal.SIGTERM
    assert should_stop(guard)
  assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_guard_sigint_second_signal_interrupts():
  # Python's own Ctrl-C handler, whatever the test runner inherited (a background job under a
  # non-interactive shell starts with SIGINT ignored, and the guard then rightly ignores it too)
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      with PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested and guard.signal == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # the previous handler: KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, inherited)


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
  import os, sys
  pid, port, directory, repo = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  sys.path.insert(0, repo)
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from postrl.checkpoint import Checkpointer, PreemptionGuard, should_stop
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices())
  full = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
  x = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("data")), lambda i: full[i])
  ckpt = Checkpointer(directory, save_every=5, fingerprint={"n": 1})
  assert ckpt.save(5, {"x": x}, {"pos": 5})
  ckpt.wait()
  guard = PreemptionGuard()
  guard.requested = pid == 1  # only one process got SIGTERM: both must stop
  assert should_stop(guard)
  guard.requested = False
  assert not should_stop(guard)
  replicated = jax.ShapeDtypeStruct(full.shape, np.float32, sharding=NamedSharding(mesh, P()))
  ckpt2 = Checkpointer(directory, save_every=5, fingerprint={"n": 1})
  state, extra = ckpt2.restore(None, {"x": replicated})
  assert extra == {"pos": 5}
  for shard in state["x"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), full)
  ckpt.close()
  print("ok", pid)
""")


def test_two_processes_save_restore_and_agree_to_stop(tmp_path):
  """2 processes x 4 CPU devices = one 8-device mesh (gloo over loopback), like a multi-host pod."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  argv = lambda i: [sys.executable, str(script), str(i), str(port), str(tmp_path / "ckpt"), REPO]
  procs = [subprocess.Popen(argv(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"ok {i}" in out, out[-3000:]
  assert os.listdir(tmp_path / "ckpt") == ["5"]


@pytest.mark.parametrize("settings,message", [(dict(save_every=0), "save_every must be >= 1"),
                                              (dict(save_every=1, keep=0), "keep must be >= 1")])
def test_checkpoint_settings_that_cannot_work_are_checkpoint_errors(tmp_path, settings, message):
  # a CheckpointError is one of launch.py's user errors: one line, not a trace
  with pytest.raises(CheckpointError, match=message):
    Checkpointer(str(tmp_path / "ckpt"), **settings)
