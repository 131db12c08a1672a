"""generate_continuous: the outputs of ``generate`` whatever the slots and refills, per-prompt
random streams, the log-prob contract, stale cache rows never read, the work it reports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.logprobs import model_apply_fn, token_logps
from postrl.models import Transformer
from postrl.models.transformer import KVCache
from postrl.sampling import generate, generate_continuous, pad_prompts
from tests.conftest import tiny_config

N = 12
FIELDS = ("tokens_BxN", "lengths_B", "logps_BxN", "model_logps_BxN", "finished_B")


@pytest.fixture(scope="module")
def model():
  return Transformer(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(3, 60, int(rng.integers(2, 9))).tolist() for _ in range(11)]


@pytest.fixture(scope="module")
def eos(model, prompts):
  """A token most rows emit somewhere in their first N greedy steps (rows end at many steps)."""
  tokens, lengths = pad_prompts(prompts)
  free = np.asarray(generate(model, tokens, lengths, max_new_tokens=N, temperature=0.0,
                             eos_ids=()).tokens_BxN)
  ids, counts = np.unique(np.concatenate([np.unique(row) for row in free]), return_counts=True)
  return int(ids[np.argmax(counts)])


def _assert_same(expected, got, exact_tokens=True):
  if exact_tokens:
    np.testing.assert_array_equal(got.tokens_BxN, expected.tokens_BxN)
  np.testing.assert_array_equal(got.lengths_B, expected.lengths_B)
  np.testing.assert_array_equal(got.finished_B, expected.finished_B)
  np.testing.assert_allclose(got.model_logps_BxN, expected.model_logps_BxN, atol=2e-5)
  np.testing.assert_allclose(got.logps_BxN, expected.logps_BxN, atol=2e-5)


@pytest.mark.parametrize("slots,prefill_rows", [(1, 1), (3, 1), (4, 2), (4, 4), (11, 3), (16, 4)])
def test_greedy_equals_generate_for_any_slots_and_refills(model, prompts, eos, slots,
                                                          prefill_rows):
  tokens, lengths = pad_prompts(prompts, multiple=4)
  expected = generate(model, tokens, lengths, max_new_tokens=N, temperature=0.0, eos_ids=(eos,))
  lens = np.asarray(expected.lengths_B)
  assert (lens < N).sum() >= 4 and (lens == N).sum() >= 1  # rows end early and late
  got = generate_continuous(model, tokens, lengths, slots=slots, prefill_rows=prefill_rows,
                            max_new_tokens=N, temperature=0.0, eos_ids=(eos,))
  _assert_same(expected, got)
  # decode steps: every prompt's tokens pass through a slot; B slots per step
  assert int(got.decode_steps) * max(slots, 1) >= int(lens.sum())
  if slots >= len(prompts):
    assert int(got.prefills) == 1 and int(got.decode_steps) == lens.max()
  else:
    assert int(got.prefills) >= -(-(len(prompts) - slots) // prefill_rows) + 1
  if slots == 1:  # one slot runs the prompts one after another
    assert int(got.decode_steps) == lens.sum()


def test_sampled_tokens_follow_the_prompt_not_the_schedule(model, prompts, eos):
  """Prompt q's t-th draw uses fold_in(fold_in(key, q), t): slots and refill sizes leave the
  tokens as they are; another key changes them."""
  tokens, lengths = pad_prompts(prompts)
  settings = dict(max_new_tokens=N, temperature=1.0, top_k=20, top_p=0.95, eos_ids=(eos,),
                  key=jax.random.key(7))
  outs = [generate_continuous(model, tokens, lengths, slots=s, prefill_rows=r, **settings)
          for s, r in ((2, 1), (5, 2), (11, 11))]
  for out in outs[1:]:
    _assert_same(outs[0], out)
  assert len(set(np.asarray(outs[0].lengths_B).tolist())) > 1
  other = generate_continuous(model, tokens, lengths, slots=5, prefill_rows=2,
                              **dict(settings, key=jax.random.key(8)))
  assert not np.array_equal(other.tokens_BxN, outs[0].tokens_BxN)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_copies_of_one_prompt_draw_their_own_samples(model, impl):
  """A GRPO group repeats one prompt G times: each copy needs its own random stream (or every
  advantage is 0), and each step its own draw; also with the kernel's one key per iteration."""
  tokens, lengths = pad_prompts([[5, 6, 7]] * 4)
  out = generate_continuous(model, tokens, lengths, slots=2, prefill_rows=1, max_new_tokens=6,
                            temperature=1.0, eos_ids=(), key=jax.random.key(0),
                            sampling_impl=impl, interpret=True)
  toks = np.asarray(out.tokens_BxN)
  assert len({tuple(r) for r in toks.tolist()}) == 4
  assert all(len(set(r)) > 1 for r in toks.tolist())


def _assert_model_logps_are_the_training_paths(model, prompts, out):
  """Each prompt's sampled tokens, recomputed by ``token_logps``, give ``model_logps_BxN``."""
  full = [p + np.asarray(out.tokens_BxN[q, :int(out.lengths_B[q])]).tolist()
          for q, p in enumerate(prompts)]
  graphdef, params = nnx.split(model)
  recomputed = token_logps(model_apply_fn(graphdef), params, jnp.asarray(pad_prompts(full)[0]))
  for q, p in enumerate(prompts):
    n = int(out.lengths_B[q])
    np.testing.assert_allclose(out.model_logps_BxN[q, :n], recomputed[q, len(p):len(p) + n],
                               rtol=1e-5, atol=1e-5)


def test_model_logps_equal_the_training_path(model, prompts, eos):
  tokens, lengths = pad_prompts(prompts)
  out = generate_continuous(model, tokens, lengths, slots=3, prefill_rows=2, max_new_tokens=N,
                            temperature=0.8, eos_ids=(eos,), key=jax.random.key(1))
  _assert_model_logps_are_the_training_paths(model, prompts, out)
  for q in range(len(prompts)):
    n = int(out.lengths_B[q])
    assert np.all(np.asarray(out.tokens_BxN[q, n:]) == 0)
    assert np.all(np.asarray(out.model_logps_BxN[q, n:]) == 0.0)
    assert bool(out.finished_B[q]) == (int(out.tokens_BxN[q, n - 1]) == eos)


def test_the_sampling_kernel_keeps_the_log_prob_contract(model, prompts, eos):
  """The sort-free kernel (interpret mode) draws each step's batch: model log-probs equal the
  training path's, the sampling log-prob is NaN under top-p (not computed); parameters on two
  devices are refused."""
  tokens, lengths = pad_prompts(prompts[:4])
  out = generate_continuous(model, tokens, lengths, slots=2, prefill_rows=1, max_new_tokens=4,
                            temperature=0.7, top_p=0.9, eos_ids=(eos,), key=jax.random.key(2),
                            sampling_impl="pallas", interpret=True)
  _assert_model_logps_are_the_training_paths(model, prompts[:4], out)
  for q in range(4):
    assert np.all(np.isnan(np.asarray(out.logps_BxN[q, :int(out.lengths_B[q])])))
  graphdef, params = nnx.split(model)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  placed = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  with pytest.raises(ValueError, match="one device; the parameters span 2"):
    generate_continuous((graphdef, placed), tokens, lengths, slots=2, key=jax.random.key(0),
                        max_new_tokens=2, top_p=0.9, sampling_impl="pallas", interpret=True)


def test_no_slot_is_read_before_its_row_writes_it(model, monkeypatch):
  """Every cache starts filled with a large value, as if earlier prompts had left keys / values
  everywhere: a read of any slot a row has not written itself (a stale refill, a masked-off
  slot) changes the greedy tokens. Prompts of 1-11 tokens refill 2 slots one at a time."""
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 60, int(rng.integers(1, 12))).tolist() for _ in range(6)]
  tokens, lengths = pad_prompts(prompts)
  expected = generate(model, tokens, lengths, max_new_tokens=8, temperature=0.0, eos_ids=())
  zeros = KVCache.zeros.__func__

  def filled(cls, cfg, batch, length):
    c = zeros(cls, cfg, batch, length)
    return cls(tuple(x + 50.0 for x in c.k), tuple(x + 50.0 for x in c.v))

  monkeypatch.setattr(KVCache, "zeros", classmethod(filled))
  got = generate_continuous(model, tokens, lengths, slots=2, prefill_rows=1, max_new_tokens=8,
                            temperature=0.0, eos_ids=())
  np.testing.assert_array_equal(got.tokens_BxN, expected.tokens_BxN)
  np.testing.assert_allclose(got.model_logps_BxN, expected.model_logps_BxN, atol=2e-5)


def test_without_eos_every_prompt_runs_the_whole_budget(model, prompts):
  tokens, lengths = pad_prompts(prompts)
  expected = generate(model, tokens, lengths, max_new_tokens=5, temperature=0.0, eos_ids=())
  got = generate_continuous(model, tokens, lengths, slots=4, prefill_rows=4, max_new_tokens=5,
                            temperature=0.0, eos_ids=())
  _assert_same(expected, got)
  assert int(got.decode_steps) == 5 * 3  # 11 prompts in groups of 4, 4, 3: whole rounds
  assert not np.asarray(got.finished_B).any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(slots=0), "slots must be an integer >= 1"),
    (dict(slots=2.5), "slots must be an integer >= 1"),
    (dict(slots=4, prefill_rows=5), r"prefill_rows must be an integer in \[1, slots=4\]"),
    (dict(slots=4, prefill_rows=0), r"prefill_rows must be an integer in \[1, slots=4\]"),
    (dict(slots=2, max_new_tokens=0), "generate_continuous: max_new_tokens"),
    (dict(slots=2, temperature=1.0), "generate_continuous: sampling with temperature > 0 needs"),
    (dict(slots=2, eos_ids=(10**6,)), "generate_continuous: eos_ids must be token ids"),
])
def test_bad_arguments_are_named(model, kwargs, match):
  tokens, lengths = pad_prompts([[5, 6], [7]])
  kwargs = dict(dict(max_new_tokens=3, temperature=0.0), **kwargs)
  with pytest.raises(ValueError, match=match):
    generate_continuous(model, tokens, lengths, **kwargs)
  with pytest.raises(ValueError, match="generate_continuous: prompt_BxP has no rows"):
    generate_continuous(model, np.zeros((0, 3), np.int32), np.zeros((0,), np.int32), slots=2,
                        max_new_tokens=3, temperature=0.0)
