"""The shared loop: bitwise resume after SIGTERM, NaN stop, incompatible checkpoints, outputs."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl import sharding
from postrl.checkpoint import CheckpointError
from postrl.logprobs import model_apply_fn
from postrl.metrics import read_metrics
from postrl.models import Transformer
from postrl.trainers.loop import NonFiniteError, fit
from postrl.trainers.sft import sft_loss_fn
from postrl.trainers.step import OptimizerConfig, make_optimizer
from tests.conftest import tiny_config

CFG = tiny_config(vocab_size=128)


class Batches:
  """Deterministic batches with a checkpointable position; optionally signals at a batch."""

  def __init__(self, sigterm_at=None, poison_at=None):
    self.i, self.sigterm_at, self.poison_at = 0, sigterm_at, poison_at

  def __next__(self):
    rng = np.random.RandomState(self.i)
    self.i += 1
    if self.i == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    # each row counts up from a random start modulo 11: learnable, so the loss falls
    tokens = (3 + (rng.randint(0, 11, (8, 1)) + np.arange(16)[None]) % 11).astype(np.int32)
    seg = np.ones((8, 16), np.int32)
    seg[:, 12:] = 2
    mask = np.ones((8, 16), np.int32)
    mask[:, :3] = 0
    poison = np.full((8,), 1.0 if self.i == self.poison_at else 0.0, np.float32)
    return dict(tokens=tokens, segment_ids=seg, loss_mask=mask, poison=poison)

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def _setup():
  graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
  base = sft_loss_fn(model_apply_fn(graphdef))

  def loss_fn(params, batch):
    loss, metrics = base(params, batch)
    # a random term (like dropout) so that resume must also restore the RNG stream exactly
    loss = loss + 1e-2 * jax.random.uniform(batch["rng"])
    return loss * jnp.where(batch["poison"].max() > 0, jnp.nan, 1.0), metrics

  tx = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=2, total_steps=6))
  return loss_fn, params, tx


def _fit(workdir, batches, mesh, **kwargs):
  loss_fn, params, tx = _setup()
  return fit(loss_fn, params, tx, batches, mesh=mesh, total_steps=6, workdir=str(workdir),
             save_every=2, progress=False, fingerprint={"model": "tiny"}, **kwargs)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mesh):
  workdir = tmp_path_factory.mktemp("full")
  result = _fit(workdir, Batches(), mesh)
  return workdir, result


def test_outputs_written(uninterrupted):
  workdir, result = uninterrupted
  rows = read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["loss"]) and r["perf/tokens_per_second"] > 0 for r in rows)
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert (workdir / "loss.png").stat().st_size > 1000
  assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]  # keep the last 2
  assert int(result.state.step) == 6


def test_sigterm_then_resume_is_bitwise_identical(tmp_path, uninterrupted, mesh):
  full_dir, full = uninterrupted
  first = _fit(tmp_path, Batches(sigterm_at=3), mesh)
  assert first.preempted and int(first.state.step) == 3
  assert "3" in os.listdir(tmp_path / "checkpoints")
  resumed = _fit(tmp_path, Batches(), mesh)  # a fresh iterator: the position comes from the ckpt
  assert resumed.resumed_from == 3 and not resumed.preempted
  want = {r["step"]: r["loss"] for r in read_metrics(full_dir / "metrics.jsonl")}
  got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")}
  assert got == want  # bitwise: the floats are identical, steps 1-3 from the first run
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state)),
                  jax.tree.leaves(jax.device_get(full.state))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("poison_at,saved", [(5, [2, 4]), (4, [2]), (6, [2, 4])])
def test_nonfinite_loss_stops_naming_the_step(tmp_path, mesh, poison_at, saved):
  """Checkpoints come every 2 steps: a bad step on a save step (4) or the last (6) is not saved."""
  with pytest.raises(NonFiniteError, match=rf"step {poison_at}: non-finite loss.*last checkpoint: "
                                           rf"step {saved[-1]}"):
    _fit(tmp_path, Batches(poison_at=poison_at), mesh)
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == saved
  rows = read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, poison_at))


def test_incompatible_checkpoint_is_an_error(tmp_path, mesh):
  _fit(tmp_path, Batches(sigterm_at=2), mesh)
  loss_fn, params, tx = _setup()
  with pytest.raises(CheckpointError, match="fingerprint differs"):
    fit(loss_fn, params, tx, Batches(), mesh=mesh, total_steps=6, workdir=str(tmp_path),
        save_every=2, progress=False, fingerprint={"model": "other"})


def test_fingerprint_ignores_how_the_model_computes_but_not_what():
  """A checkpoint resumes after the execution options change (attention implementation, remat,
  decode attention: the same function; ``attention_impl="auto"`` resolves per machine), not after
  the architecture or the dtype changes."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from postrl.trainers.common import fingerprint  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(param_dtype="float32", seed=0))
  base = fingerprint(config, tiny_config())
  assert "attention_impl" not in base["model"] and base["model"]["hidden_size"] == 64
  for same in (dict(attention_impl="xla"), dict(remat="full"), dict(decode_attention_impl="xla"),
               dict(decode_block_impl="pallas")):
    assert fingerprint(config, tiny_config(**same)) == base, same
  for other in (dict(hidden_size=32, num_attention_heads=2), dict(dtype="bfloat16")):
    assert fingerprint(config, tiny_config(**other)) != base, other
