"""Distillation trainer: student initialisation, the chunked loss against the library's losses,
top-k cache, on-policy batches, the frozen teacher, and the job through launch.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from postrl import peft, sharding
from postrl.data.records import DataError
from postrl.logprobs import model_apply_fn
from postrl.losses import cross_entropy, distill, distill_topk
from postrl.metrics import read_metrics
from postrl.models import ConfigError, Transformer, load_pretrained
from postrl.sampling.generate import generate
from postrl.trainers import distill as D
from postrl.trainers.loop import create_state
from postrl.trainers.step import OptimizerConfig, make_optimizer, make_train_step
from tests.conftest import tiny_config
from tests.jax_cache import JAX_CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = tiny_config(num_hidden_layers=4, tie_word_embeddings=False)


def _model(cfg=CFG, seed=0):
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])


@pytest.fixture(scope="module")
def models():
  """A 4-layer teacher and a 2-layer student made from its layers 0 and 3, then perturbed (so
  the two differ)."""
  t_graph, t_params = _model()
  s_cfg, s_params = D.student_from_teacher(t_params, CFG, [0, 3])
  s_params = jax.tree.map(lambda x: x + 0.05 * np.random.RandomState(x.size % 97).randn(
      *x.shape).astype(x.dtype), s_params)
  return D.graphdef_of(s_cfg), s_params, t_graph, t_params


def _batch():
  """Two rows: row 0 packs two sequences (prompt 3 + completion 4, prompt 2 + completion 3) then
  padding; row 1 is one sequence (prompt 4 + completion 6)."""
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, CFG.vocab_size, (2, 14)).astype(np.int32)
  seg = np.array([[1] * 7 + [2] * 5 + [0] * 2, [1] * 10 + [0] * 4], np.int32)
  mask = np.array([[0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0],
                   [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
  tokens[seg == 0] = 0
  return dict(tokens=tokens, segment_ids=seg, loss_mask=mask)


def _batch8():
  """``_batch`` four times: 8 rows, one per device of the (2, 2, 2) mesh."""
  return {k: np.concatenate([v] * 4) for k, v in _batch().items()}


# ------------------------------------------------------------------------ student initialisation

def test_select_layers():
  assert D.select_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
  assert D.select_layers(30, 2) == [0, 29] and D.select_layers(30, 1) == [0]
  assert D.select_layers(30, 30) == list(range(30))
  assert D.select_layers(6, 3, "first") == [0, 1, 2]
  assert D.select_layers(6, 3, "last") == [3, 4, 5]
  with pytest.raises(ConfigError, match="num_layers"):
    D.select_layers(6, 7)
  with pytest.raises(ConfigError, match="config.student.select"):
    D.select_layers(6, 3, "middle")


def test_student_from_teacher_copies_the_chosen_layers():
  _, t_params = _model()
  s_cfg, s_params = D.student_from_teacher(t_params, CFG, [1, 3])
  assert s_cfg.num_hidden_layers == 2 and s_cfg.hidden_size == CFG.hidden_size
  model = nnx.merge(D.graphdef_of(s_cfg), s_params)  # the structure of a 2-layer Transformer
  teacher = dict(t_params.flat_state())
  for path, var in s_params.flat_state():
    source = ("layers", [1, 3][path[1]]) + tuple(path[2:]) if path[0] == "layers" else path
    want = np.asarray(teacher[source].get_value())
    np.testing.assert_array_equal(var.get_value(), want)
    assert not np.shares_memory(np.asarray(var.get_value()), want)
  assert model.lm_head is not None and len(model.layers) == 2


def test_student_equals_teacher_when_the_dropped_layers_are_identities():
  """A layer whose output projections are 0 adds nothing to the residual stream: dropping it
  (student_from_teacher) must leave the logits unchanged."""
  t_graph, t_params = _model()
  for l in (1, 2):
    layer = t_params["layers"][l]
    layer["self_attn"]["o_proj"]["kernel"].set_value(jnp.zeros_like(
        layer["self_attn"]["o_proj"]["kernel"].get_value()))
    layer["mlp"]["down_proj"]["kernel"].set_value(jnp.zeros_like(
        layer["mlp"]["down_proj"]["kernel"].get_value()))
  s_cfg, s_params = D.student_from_teacher(t_params, CFG, [0, 3])
  tokens = np.random.RandomState(1).randint(0, CFG.vocab_size, (2, 9))
  want = nnx.merge(t_graph, t_params)(tokens)
  got = nnx.merge(D.graphdef_of(s_cfg), s_params)(tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  other_cfg, other = D.student_from_teacher(t_params, CFG, [0, 1])  # drops a real layer
  assert not np.allclose(nnx.merge(D.graphdef_of(other_cfg), other)(tokens), want, atol=1e-3)


@pytest.mark.parametrize("layers", [[], [0, 0], [2, 1], [4], [-1]])
def test_student_from_teacher_rejects_bad_layers(layers):
  _, t_params = _model()
  with pytest.raises(ConfigError, match="config.student.layers"):
    D.student_from_teacher(t_params, CFG, layers)


# ------------------------------------------------------------------------------------ the loss

def _full_logits(graph, params, batch):
  return nnx.merge(graph, params)(batch["tokens"], segment_ids_BxT=batch["segment_ids"])


def _library_mask(batch):
  """Position t (< T-1) counts when token t+1 is a completion token of the same sequence:
  written out for the hand-made batch of ``_batch``."""
  m = np.zeros((2, 13), np.float32)
  m[0, [2, 3, 4, 5, 8, 9, 10]] = 1  # predicts tokens 3-6 and 9-11
  m[1, [3, 4, 5, 6, 7, 8]] = 1       # predicts tokens 4-9
  return m


@pytest.mark.parametrize("divergence", D.DIVERGENCES)
def test_dense_loss_equals_the_library_on_full_logits(models, divergence):
  s_graph, s_params, t_graph, t_params = models
  batch = _batch()
  s = D.DistillSettings(divergence=divergence, temperature=2.0, beta=0.3, skew=0.2)
  zs, zt = _full_logits(s_graph, s_params, batch), _full_logits(t_graph, t_params, batch)
  mask = _library_mask(batch)
  want, want_m = distill(zs[:, :-1], zt[:, :-1], mask, divergence=divergence, beta=0.3, skew=0.2,
                         temperature=2.0)
  _, kl_m = distill(zs[:, :-1], zt[:, :-1], mask, divergence="forward_kl")
  variants = [(None, None), (5, None), (4, 9)] if divergence == "forward_kl" else [(3, 7)]
  for chunk, positions in variants:
    loss_fn = D.distill_loss_fn(model_apply_fn(s_graph), model_apply_fn(t_graph), s,
                                chunk=chunk, positions=positions)
    loss, m = jax.jit(loss_fn)({"student": s_params, "teacher": t_params}, batch)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(m[f"distill/{divergence}"], want_m[f"distill/{divergence}"],
                               rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(m["distill/kl_forward"], kl_m["distill/forward_kl"], rtol=2e-5)
    np.testing.assert_allclose(m["distill/top1_agreement"], want_m["distill/top1_agreement"])
    assert m["loss_weight"] == mask.sum() == 13


def test_hard_label_term_is_the_cross_entropy_of_dataset_rows(models):
  s_graph, s_params, t_graph, t_params = models
  batch = _batch()
  zs = _full_logits(s_graph, s_params, batch)
  mask = _library_mask(batch)
  params = {"student": s_params, "teacher": t_params}

  def loss(weight, rows=None):
    fn = D.distill_loss_fn(model_apply_fn(s_graph), model_apply_fn(t_graph),
                           D.DistillSettings(hard_label_weight=weight), chunk=3, positions=8)
    return jax.jit(fn)(params, batch if rows is None else dict(batch, dataset_rows=rows))

  kd, m = loss(0.0)
  ce, _ = cross_entropy(zs[:, :-1], batch["tokens"][:, 1:], mask)
  got, m2 = loss(0.5)
  np.testing.assert_allclose(got, kd + 0.5 * ce, rtol=1e-5)
  assert "distill/hard_label_nll" not in m and m2["distill/nll"] == pytest.approx(float(ce))
  row0_mask = mask * np.array([[1.0], [0.0]])  # row 1 sampled: no hard labels, same divisor
  ce0, _ = cross_entropy(zs[:, :-1], batch["tokens"][:, 1:], row0_mask)
  got, m3 = loss(0.5, np.array([1, 0], np.int32))
  np.testing.assert_allclose(got, kd + 0.5 * ce0 * row0_mask.sum() / mask.sum(), rtol=1e-5)
  assert m3["loss_weight"] == 13


def test_chunked_and_gathered_gradients_equal_the_plain_ones(models):
  s_graph, s_params, t_graph, t_params = models
  s = D.DistillSettings(divergence="jsd")

  def grads(chunk, positions):
    loss_fn = D.distill_loss_fn(model_apply_fn(s_graph), model_apply_fn(t_graph), s, chunk=chunk,
                                positions=positions)
    return jax.jit(jax.grad(lambda p: loss_fn(p, _batch())[0]))(
        {"student": s_params, "teacher": t_params})

  want = grads(None, None)
  got = grads(3, 7)
  for a, b in zip(jax.tree.leaves(got["student"]), jax.tree.leaves(want["student"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(want["teacher"]))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want["student"])) > 0


def test_packed_rows_equal_the_same_sequences_unpacked(models):
  """Shift and segment masks: two sequences packed in one row give the loss they give alone."""
  s_graph, s_params, t_graph, t_params = models
  packed = _batch()
  a, b = slice(0, 7), slice(7, 12)
  unpacked = {k: np.zeros((2, 14), np.int32) for k in packed}
  for row, part in enumerate((a, b)):
    n = part.stop - part.start
    unpacked["tokens"][row, :n] = packed["tokens"][0, part]
    unpacked["loss_mask"][row, :n] = packed["loss_mask"][0, part]
    unpacked["segment_ids"][row, :n] = 1
  loss_fn = jax.jit(D.distill_loss_fn(model_apply_fn(s_graph), model_apply_fn(t_graph),
                                      D.DistillSettings(), chunk=4))
  params = {"student": s_params, "teacher": t_params}
  row0 = {k: v[:1] for k, v in packed.items()}
  l_packed, m_packed = loss_fn(params, row0)
  l_unpacked, m_unpacked = loss_fn(params, unpacked)
  assert m_packed["loss_weight"] == m_unpacked["loss_weight"] == 7
  np.testing.assert_allclose(l_packed, l_unpacked, rtol=1e-5)


def test_topk_loss_equals_the_library_and_full_k_equals_dense(models, mesh):
  s_graph, s_params, t_graph, t_params = models
  batch = _batch()
  zs = _full_logits(s_graph, s_params, batch)
  mask = _library_mask(batch)
  t_dev = sharding.put_global(t_params, sharding.state_shardings(t_params, mesh))
  for k in (5, CFG.vocab_size):
    ids, logps = D.teacher_topk_fn(t_graph, t_dev, mesh=mesh, k=k, chunk=4)(_batch8())
    ids, logps = ids[:2], logps[:2]
    assert ids.shape == (2, 14, k) and (ids[:, 0] == 0).all()  # token 0 is never predicted
    want, _ = distill_topk(zs[:, :-1], ids[:, 1:], logps[:, 1:], mask, temperature=1.5)
    loss_fn = D.distill_loss_fn(model_apply_fn(s_graph), None, D.DistillSettings(
        name="distill_topk", temperature=1.5), chunk=3, positions=7)
    loss, m = jax.jit(loss_fn)({"student": s_params}, dict(batch, topk_ids=ids, topk_logps=logps))
    np.testing.assert_allclose(loss, want, rtol=2e-5)
  # all V entries stored: the sparse loss is the dense forward KL
  dense, _ = distill(zs[:, :-1], _full_logits(t_graph, t_params, batch)[:, :-1], mask,
                     temperature=1.5)
  np.testing.assert_allclose(loss, dense, rtol=2e-5)
  assert m["distill/teacher_topk_mass"] == pytest.approx(1.0, abs=1e-5)


def test_gather_positions_keeps_the_first_loss_positions_in_order():
  valid = jnp.array([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1]], bool)
  x = jnp.arange(12).reshape(2, 6)
  (got,), v = D.gather_positions((x,), valid, 3)
  np.testing.assert_array_equal(got[v], [1, 3, 4, 6, 11])
  np.testing.assert_array_equal(v, [[1, 1, 1], [1, 1, 0]])
  np.testing.assert_array_equal(D.loss_positions_per_row(_batch()), [7, 6])


def test_settings_reject_bad_values():
  def cfg(**kw):
    base = dict(name="distill", divergence="forward_kl", beta=0.5, skew=0.1, temperature=1.0,
                scale_by_temperature_sq=True, topk=8, lmbda=0.0, max_new_tokens=8,
                sample_batch_size=4, hard_label_weight=0.0)
    return ml_collections.ConfigDict(dict(base, **kw))
  for bad, key in [(dict(name="distil"), "config.loss.name"),
                   (dict(divergence="kl"), "config.loss.divergence"),
                   (dict(name="distill_topk", divergence="jsd"), "config.loss.divergence"),
                   (dict(divergence="jsd", beta=1.0), "config.loss.beta"),
                   (dict(temperature=0.0), "config.loss.temperature"),
                   (dict(lmbda=1.5), "config.loss.lmbda"),
                   (dict(hard_label_weight=-1.0), "config.loss.hard_label_weight")]:
    with pytest.raises(ConfigError, match=key):
      D.settings(cfg(**bad))
  assert D.settings(cfg(divergence="jsd", beta=0.9)).beta == 0.9


# ------------------------------------------------------------------------- frozen teacher

def test_a_sharded_step_updates_the_student_only(models, mesh):
  # the teacher is a frozen, non-donated argument of the step (as run() passes it through fit)
  s_graph, s_params, t_graph, t_params = models
  tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1, total_steps=2))
  state, shardings = create_state(jax.tree.map(np.array, {"student": s_params}), tx, seed=0,
                                  mesh=mesh)
  frozen = nnx.State({"teacher": t_params})
  frozen_shardings = sharding.state_shardings(frozen, mesh)
  frozen = sharding.put_global(frozen, frozen_shardings)
  step = make_train_step(D.distill_loss_fn(model_apply_fn(s_graph), model_apply_fn(t_graph),
                                           D.DistillSettings(), chunk=4),
                         tx, state_shardings=shardings,
                         batch_sharding=sharding.batch_sharding(mesh), mesh=mesh,
                         combine=peft.combine, frozen_shardings=frozen_shardings)
  batch = _batch8()
  new, metrics = step(state, sharding.put_batch(batch, mesh), frozen)
  new = jax.device_get(new)
  for a, b in zip(jax.tree.leaves(jax.device_get(frozen["teacher"])), jax.tree.leaves(t_params)):
    np.testing.assert_array_equal(a, b)  # not donated, not touched
  assert set(new.params.keys()) == {"student"}
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new.params["student"]),
                                                   jax.tree.leaves(s_params)))
  opt_size = sum(x.size for x in jax.tree.leaves(new.opt_state))
  assert opt_size < 2 * sum(x.size for x in jax.tree.leaves(s_params)) + 100
  assert float(metrics["loss"]) > 0 and float(metrics["step/finite"]) == 1.0
  # the same step with the teacher inside the loss's params gives the same loss (combine is exact)
  full = {"student": s_params, "teacher": t_params}
  loss_fn = D.distill_loss_fn(model_apply_fn(s_graph), model_apply_fn(t_graph),
                              D.DistillSettings(), chunk=4)
  want, _ = loss_fn(full, {k: jnp.asarray(v) for k, v in batch.items()})
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)


# ---------------------------------------------------------------------------- top-k cache

def test_topk_cache_attaches_what_the_teacher_computes(models, mesh, tmp_path):
  _, _, t_graph, t_params = models
  t_dev = sharding.put_global(t_params, sharding.state_shardings(t_params, mesh))
  topk = D.teacher_topk_fn(t_graph, t_dev, mesh=mesh, k=4, chunk=None)
  batch = _batch8()
  other = {k: v[::-1].copy() for k, v in batch.items()}  # the same sequences, other rows
  empty = {k: np.zeros_like(v) for k, v in batch.items()}
  calls = []
  counted = lambda b: calls.append(1) or topk(b)
  cache = D.topk_cache(str(tmp_path), "abc", lambda: [batch, empty], counted)
  assert len(cache) == 3 and len(cache.ids) == 13 and len(calls) == 1
  again = D.topk_cache(str(tmp_path), "abc", lambda: [batch], counted)
  assert len(calls) == 1 and os.listdir(tmp_path) == ["abc.npz"]  # reused from the file
  want_ids, want_logps = topk(other)
  got = again.attach(other)
  mask = other["loss_mask"] > 0
  np.testing.assert_array_equal(got["topk_ids"][mask], want_ids[mask])
  np.testing.assert_allclose(got["topk_logps"][mask], want_logps[mask])
  assert (got["topk_ids"][~mask] == 0).all()
  changed = dict(batch, tokens=batch["tokens"] + 1)
  with pytest.raises(DataError, match="teacher top-k cache"):
    cache.attach(changed)


# -------------------------------------------------------------------------------- on-policy

def test_pack_sequences_first_fit():
  seqs = [([1] * 5, [0, 0, 1, 1, 1]), ([2] * 4, [0, 1, 1, 1]), ([3] * 3, [0, 1, 1]),
          ([4] * 9, [0] * 9), ([5] * 2, [0, 1])]
  batch, dropped = D.pack_sequences(seqs, batch_size=2, seq_len=8, pad_id=9)
  np.testing.assert_array_equal(batch["tokens"], [[1, 1, 1, 1, 1, 3, 3, 3],
                                                  [2, 2, 2, 2, 5, 5, 9, 9]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 1, 2, 2, 2],
                                                       [1, 1, 1, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0, 1, 1],
                                                     [0, 1, 1, 1, 0, 1, 0, 0]])
  assert dropped == 1  # the 9 tokens of sequence 3 fit no row of 8 (it is cut to 8: still none)
  # at most 4 loss tokens a row: sequence 2 (2 more) fits no row; sequence 4 (1 more) row 0
  capped, dropped = D.pack_sequences(seqs, batch_size=2, seq_len=8, max_loss_tokens=4)
  np.testing.assert_array_equal(D.loss_positions_per_row(capped), [4, 3])
  np.testing.assert_array_equal(capped["segment_ids"], [[1, 1, 1, 1, 1, 2, 2, 0],
                                                        [1, 1, 1, 1, 0, 0, 0, 0]])
  assert dropped == 2


def test_segment_prompts():
  batch = _batch()
  prompts = D.segment_prompts(batch)
  np.testing.assert_array_equal(prompts[0], batch["tokens"][0, :3])
  np.testing.assert_array_equal(prompts[1], batch["tokens"][0, 7:9])
  np.testing.assert_array_equal(prompts[2], batch["tokens"][1, :4])
  assert len(prompts) == 3


def test_onpolicy_coin_is_seeded_and_has_the_right_rate():
  draws = [D.onpolicy_coin(3, step, 0.3) for step in range(2000)]
  assert draws == [D.onpolicy_coin(3, step, 0.3) for step in range(2000)]
  assert 0.26 < np.mean(draws) < 0.34
  assert not any(D.onpolicy_coin(3, s, 0.0) for s in range(50))
  assert all(D.onpolicy_coin(3, s, 1.0) for s in range(50))


class _Offline:
  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return _batch()

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def test_onpolicy_batches_hold_the_students_samples(models):
  s_graph, s_params, _, _ = models
  sampler = D.OnPolicySampler(s_graph, eos_ids=(CFG.eos_token_id,), pad_id=0, batch_size=2,
                              seq_len=14, max_new_tokens=3, temperature=0.0, sample_batch_size=2,
                              seed=0, max_loss_tokens=8)
  source = D.DistillBatches(_Offline(), lmbda=1.0, sampler=sampler, positions=8)
  got = source.next_batch({"student": s_params}, 0)
  metrics = source.pop_metrics()
  assert metrics["distill/onpolicy_fraction"] == 1.0 and source.pop_metrics() == {}
  prompts = D.segment_prompts(_batch())
  assert [p.tolist() for p in D.segment_prompts(got)] == [p.tolist() for p in prompts]
  for b, pos in D._segments(got):  # pylint: disable=protected-access
    mask = got["loss_mask"][b, pos] > 0
    prompt = got["tokens"][b, pos][~mask]
    out = generate((s_graph, s_params), prompt[None], np.array([len(prompt)]), max_new_tokens=3,
                   temperature=0.0, eos_ids=(CFG.eos_token_id,))
    np.testing.assert_array_equal(got["tokens"][b, pos][mask],
                                  np.asarray(out.tokens_BxN)[0, :int(out.lengths_B[0])])
  assert metrics["distill/sampled_length"] == 3.0
  assert source.get_state() == {"i": 1} and (got["dataset_rows"] == 0).all()
  offline = D.DistillBatches(_Offline(), lmbda=0.0)
  plain = offline.next_batch({}, 0)
  np.testing.assert_array_equal(plain["tokens"], _batch()["tokens"])
  assert (plain["dataset_rows"] == 1).all()
  assert offline.pop_metrics() == {"distill/onpolicy_fraction": 0.0}
  with pytest.raises(ConfigError, match="config.loss_positions=6"):
    D.DistillBatches(_Offline(), positions=6).next_batch({}, 0)


# ---------------------------------------------------------------------------------- evaluation

def test_heldout_kl_is_zero_against_itself_and_matches_the_library(models, mesh):
  s_graph, s_params, t_graph, t_params = models
  batch = _batch8()
  same = D.heldout_fn(s_graph, s_graph, [batch], mesh=mesh, chunk=5)(s_params, s_params)
  assert same["kl_forward"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
  assert same["nll"] == pytest.approx(same["teacher_nll"])
  got = D.heldout_fn(s_graph, t_graph, [batch], mesh=mesh, chunk=5)(s_params, t_params)
  zs = _full_logits(s_graph, s_params, _batch())
  _, m = distill(zs[:, :-1], _full_logits(t_graph, t_params, _batch())[:, :-1],
                 _library_mask(_batch()))
  assert got["kl_forward"] == pytest.approx(float(m["distill/forward_kl"]), rel=1e-5)
  assert same["kl_reverse"] == pytest.approx(0.0, abs=1e-6)
  zt = _full_logits(t_graph, t_params, _batch())
  _, m_rev = distill(zs[:, :-1], zt[:, :-1], _library_mask(_batch()), divergence="reverse_kl")
  assert got["kl_reverse"] == pytest.approx(float(m_rev["distill/reverse_kl"]), rel=1e-5)
  assert got["kl_reverse"] != pytest.approx(got["kl_forward"], rel=1e-3)  # not the same direction


# ---------------------------------------------------------------------------- through launch.py

def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE_DIR)
  return env


def _launch(teacher_dir, workdir, *extra):
  # 40 records = 5 rows of 8 at seq 64 (one record per row): the teacher top-k cache covers one
  # epoch of them (5 teacher batches, not 25) and still holds every batch of a 4-step run
  args = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/distill_arith.py",
          "--workdir", str(workdir), f"--config.teacher={teacher_dir}", "--cpu_devices=8",
          "--config.student.num_layers=1", "--config.steps=2", "--config.batch_size=8",
          "--config.seq_len=64", "--config.data.num_train=40", "--config.eval.num_problems=0",
          "--config.optim.warmup_steps=1", "--config.optim.lr=1e-3", "--config.log_every=1",
          "--config.loss.max_new_tokens=4", "--config.loss.sample_batch_size=8",
          "--config.mesh=(('data', -1), ('fsdp', 2), ('tensor', 2))", *extra]
  return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)


def _metrics(workdir):
  return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def test_launch_dense_gkd_two_steps_evaluates_and_saves(tiny_model_dir, tmp_path):
  proc = _launch(tiny_model_dir, tmp_path, "--config.loss.divergence=jsd",
                 "--config.loss.lmbda=0.5", "--config.seed=1", "--config.eval.num_problems=4",
                 "--config.eval.batch_size=4", "--config.eval.max_new_tokens=4",
                 "--config.save_model=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) and "distill/kl_forward" in r and "distill/jsd" in r
             for r in rows)
  # seed 1: the coin says student samples at step 0, the dataset at step 1
  assert [r["distill/onpolicy_fraction"] for r in rows] == [
      float(D.onpolicy_coin(1, s, 0.5)) for s in range(2)] == [1.0, 0.0]
  assert rows[0]["distill/sampled_length"] > 0 and "distill/sampled_length" not in rows[1]
  results = json.loads((tmp_path / "results.json").read_text())
  assert 0.0 <= results["teacher_accuracy"] <= 1.0 and results["kl_after"] >= 0
  assert results["accuracy_before"] is not None and results["accuracy_after"] is not None
  assert results["student"].endswith("layers [0]")
  evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/kl_forward" in r]
  assert [r["step"] for r in evals] == [0, 2] and "eval/teacher_accuracy" in evals[0]
  student = load_pretrained(str(tmp_path / "model"))
  assert student.config.num_hidden_layers == 1
  # the export carries the tokenizer and chat template: the folder works as a model name
  from postrl.models import load_tokenizer  # pylint: disable=import-outside-toplevel
  exported, original = load_tokenizer(str(tmp_path / "model")), load_tokenizer(tiny_model_dir)
  chat = [{"role": "user", "content": "What is 2 + 3?"}]
  assert exported.encode_chat(chat) == original.encode_chat(chat)
  assert exported.eos_id == original.eos_id
  assert (tmp_path / "teacher_eval.json").exists()


def test_launch_topk_cache_and_onpolicy_resume_like_an_uninterrupted_run(tiny_model_dir,
                                                                          tmp_path):
  extra = ("--config.loss.name=distill_topk", "--config.loss.topk=16", "--config.loss.lmbda=0.5",
           "--config.checkpoint.every=100")
  full = _launch(tiny_model_dir, tmp_path / "full", "--config.steps=4", *extra)
  assert full.returncode == 0, full.stderr[-3000:]
  first = _launch(tiny_model_dir, tmp_path / "cut", "--config.steps=2", *extra)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "teacher top-k: wrote" in first.stdout
  again = _launch(tiny_model_dir, tmp_path / "cut", "--config.steps=4", *extra)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout and "teacher top-k: reusing" in again.stdout
  want, got = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  assert [r["loss"] for r in got] == [r["loss"] for r in want]
  assert [r["distill/onpolicy_fraction"] for r in got] == [
      r["distill/onpolicy_fraction"] for r in want]
  assert {r["distill/onpolicy_fraction"] for r in want} == {0.0, 1.0}
  # a random tiny teacher is nearly uniform over 49152 tokens: 16 of them hold little mass
  assert all(0.0 < r["distill/teacher_topk_mass"] < 1.0 for r in want)


@pytest.mark.parametrize("override,message", [
    ("--config.loss.divergence=kl", "config.loss.divergence"),
    ("--config.loss.name=distill_topk --config.loss.divergence=tvd", "config.loss.divergence"),
    ("--config.student.layers=(0,5)", "config.student.layers"),
    ("--config.loss_positions=2 --config.loss.lmbda=0.5", "config.loss_positions"),
])
def test_bad_config_is_one_line(tiny_model_dir, tmp_path, override, message):
  proc = _launch(tiny_model_dir, tmp_path, *override.split())
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "error: ConfigError" in proc.stderr and message in proc.stderr
  assert "Traceback" not in proc.stderr
