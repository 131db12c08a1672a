"""Token-level beam search: width 1 is greedy decoding, beams come sorted by length-penalised
score, a hand-built Markov chain where the length penalty changes the winner, early stopping,
token accounting, and bad widths."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from postrl.models import Transformer
from postrl.sampling import (Policy, SearchError, TokenCount, beam_search, beam_search_ids,
                             generate, pad_prompts)
from tests.conftest import tiny_config

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
PAD, BOS, EOS, A, B, C = range(6)


@pytest.fixture(scope="module")
def model():
  return Transformer(tiny_config(), rngs=nnx.Rngs(0))


def test_width_one_is_greedy_decoding(model):
  tokens, lengths = pad_prompts(PROMPTS, multiple=16)
  greedy = generate(model, tokens, lengths, max_new_tokens=10, temperature=0.0, eos_ids=())
  beam = beam_search_ids(model, tokens, lengths, width=1, max_new_tokens=10, eos_ids=())
  np.testing.assert_array_equal(beam.tokens_BxWxN[:, 0], greedy.tokens_BxN)
  np.testing.assert_allclose(beam.logps_BxW[:, 0], np.sum(greedy.model_logps_BxN, axis=1),
                             rtol=1e-5)
  np.testing.assert_allclose(beam.scores_BxW[:, 0], beam.logps_BxW[:, 0] / 10.0, rtol=1e-6)
  # with an end-of-sequence token and no length penalty, width 1 also stops where greedy does
  eos = int(greedy.tokens_BxN[0, 3])
  greedy = generate(model, tokens, lengths, max_new_tokens=10, temperature=0.0, eos_ids=(eos,))
  beam = beam_search_ids(model, tokens, lengths, width=1, max_new_tokens=10, eos_ids=(eos,),
                         length_penalty=0.0)
  np.testing.assert_array_equal(beam.lengths_BxW[:, 0], greedy.lengths_B)
  np.testing.assert_array_equal(beam.tokens_BxWxN[:, 0], greedy.tokens_BxN)
  np.testing.assert_array_equal(beam.finished_BxW[:, 0], greedy.finished_B)


def test_beams_are_sorted_by_length_penalised_log_prob(model):
  tokens, lengths = pad_prompts(PROMPTS)
  out = beam_search_ids(model, tokens, lengths, width=4, max_new_tokens=6, eos_ids=(3, 7),
                        length_penalty=0.8)
  scores = np.asarray(out.scores_BxW)
  assert np.all(np.diff(scores, axis=1) <= 0) and np.all(np.isfinite(scores))
  seqs = [PROMPTS[b] + np.asarray(out.tokens_BxWxN[b, w, :int(out.lengths_BxW[b, w])]).tolist()
          for b in range(3) for w in range(4)]
  padded, _ = pad_prompts(seqs)  # right padding: the real positions' logits are unchanged
  logp_all = jax.nn.log_softmax(jax.jit(model.__call__)(jnp.asarray(padded)), axis=-1)
  for i, seq in enumerate(seqs):
    b, w = divmod(i, 4)
    p, n = len(PROMPTS[b]), len(seq) - len(PROMPTS[b])
    logp = sum(float(logp_all[i, t - 1, seq[t]]) for t in range(p, p + n))
    np.testing.assert_allclose(out.logps_BxW[b, w], logp, rtol=1e-4)
    np.testing.assert_allclose(scores[b, w], logp / n ** 0.8, rtol=1e-4)
    assert bool(out.finished_BxW[b, w]) == (seq[-1] in (3, 7))
  assert len({tuple(np.asarray(t).tolist()) for t in out.tokens_BxWxN[0]}) == 4  # distinct beams


# --------------------------------------------------------------- a hand-built Markov chain


def _transitions():
  """p(next | last) over 6 tokens. After A: EOS e^-1, B 0.6; after B: EOS 0.5, B 0.45."""
  p = np.full((6, 6), 1 / 6)
  rest_a = (1 - math.exp(-1) - 0.6) / 4
  p[A] = [rest_a, rest_a, math.exp(-1), rest_a, 0.6, rest_a]
  p[B] = [0.0125, 0.0125, 0.5, 0.0125, 0.45, 0.0125]
  return p


def _late_bloomer():
  """After A: EOS 0.5, C 0.45; after C: EOS 0.95. A C EOS is better per token than A EOS."""
  p = np.full((6, 6), 1 / 6)
  p[A] = [0.0125, 0.0125, 0.5, 0.0125, 0.0125, 0.45]
  p[C] = [0.01, 0.01, 0.95, 0.01, 0.01, 0.01]
  return p


class MarkovLM(nnx.Module):
  """Logits depend only on the last token (a table); the KV cache passes through unused."""

  def __init__(self, transitions=None):
    self.config = tiny_config(vocab_size=6, num_hidden_layers=1, hidden_size=8,
                              intermediate_size=8, eos_token_id=EOS)
    table = _transitions() if transitions is None else transitions
    self.table = nnx.Param(jnp.log(jnp.asarray(table, jnp.float32)))

  def decode(self, tokens_BxT, positions_BxT, cache):
    del positions_BxT
    return self.table[...][tokens_BxT], cache


class MarkovTokenizer:
  """Every prompt is the single token A; tokens A, B, C read as letters."""
  eos_id, pad_id, bos_id = EOS, PAD, BOS

  def encode_chat(self, messages, add_generation_prompt=True):
    del messages, add_generation_prompt
    return [A]

  def encode(self, text, add_bos=None):
    del add_bos
    return [A] * len(text)

  def decode(self, ids):
    return "".join({A: "a", B: "b", C: "c"}.get(int(i), "") for i in ids)


def _run(alpha, norm="hf"):
  return beam_search_ids(MarkovLM(), np.asarray([[A]]), np.asarray([1]), width=2,
                         max_new_tokens=3, length_penalty=alpha, length_norm=norm)


def _hyp(out, w):
  return np.asarray(out.tokens_BxWxN[0, w, :int(out.lengths_BxW[0, w])]).tolist()


def test_length_penalty_changes_the_winner_on_a_hand_built_chain():
  s_eos = -1.0                                   # A -> EOS
  s_b_eos = math.log(0.6) + math.log(0.5)        # A -> B -> EOS
  plain = _run(0.0)
  assert [_hyp(plain, 0), _hyp(plain, 1)] == [[EOS], [B, EOS]]
  np.testing.assert_allclose(plain.scores_BxW[0], [s_eos, s_b_eos], rtol=1e-5)
  # after step 2 both slots hold finished hypotheses and the live beam (A B B, log 0.6 * 0.45)
  # cannot beat -1.204 any more: the search stops a step early
  assert int(plain.steps_B[0]) == 2
  normalised = _run(1.0)  # score = S / L
  assert [_hyp(normalised, 0), _hyp(normalised, 1)] == [[B, EOS], [B, B, EOS]]
  s_bb_eos = math.log(0.6) + math.log(0.45) + math.log(0.5)
  np.testing.assert_allclose(normalised.scores_BxW[0], [s_b_eos / 2, s_bb_eos / 3], rtol=1e-5)
  np.testing.assert_allclose(normalised.logps_BxW[0], [s_b_eos, s_bb_eos], rtol=1e-5)
  assert int(normalised.steps_B[0]) == 3 and np.all(normalised.finished_BxW)
  gnmt = _run(1.0, "gnmt")  # lp(L) = (5 + L) / 6: milder, the short answer wins again
  assert _hyp(gnmt, 0) == [EOS]
  np.testing.assert_allclose(gnmt.scores_BxW[0], [s_eos, s_b_eos / (7 / 6)], rtol=1e-5)


def test_early_stopping_never_drops_a_better_longer_hypothesis():
  # width 1: after step 1, A EOS (-0.69) is finished and the live beam A C has sum -0.80. Its
  # score at the current length is worse, but with α = 1 a longer hypothesis can still win
  # (S / L grows with L), so the search must go on: A C EOS scores (log 0.45 + log 0.95) / 2.
  run = lambda alpha: beam_search_ids(MarkovLM(_late_bloomer()), np.asarray([[A]]),
                                      np.asarray([1]), width=1, max_new_tokens=3,
                                      length_penalty=alpha)
  out = run(1.0)
  assert _hyp(out, 0) == [C, EOS] and int(out.steps_B[0]) == 2
  np.testing.assert_allclose(out.scores_BxW[0, 0], (math.log(0.45) + math.log(0.95)) / 2,
                             rtol=1e-5)
  plain = run(0.0)  # without the penalty no continuation can beat log 0.5: stop at once
  assert _hyp(plain, 0) == [EOS] and int(plain.steps_B[0]) == 1


def test_beam_search_on_a_policy_counts_tokens_and_refuses_a_too_wide_beam():
  policy = Policy(MarkovLM(), MarkovTokenizer(), max_new_tokens=3, batch_size=4)
  (r,) = beam_search(policy, ["q"], width=2, length_penalty=1.0)
  assert (r.text, r.status) == ("b", "no_answer") and [c.text for c in r.candidates] == ["b", "bb"]
  assert r.tokens == TokenCount(prompt=1, generated=2 * 3)  # one prefill, 2 beams x 3 steps
  (r0,) = beam_search(policy, ["q"], width=2, length_penalty=0.0)
  assert r0.tokens == TokenCount(prompt=1, generated=2 * 2) and r0.text == ""
  with pytest.raises(SearchError, match="larger than the batch the sampler holds"):
    beam_search(policy, ["q"], width=5)
  with pytest.raises(SearchError, match="2 x width <= the vocabulary size"):
    beam_search_ids(MarkovLM(), np.asarray([[A]]), np.asarray([1]), width=4, max_new_tokens=2)
  with pytest.raises(SearchError, match="length_norm"):
    beam_search(policy, ["q"], width=2, length_norm="nmt")


def test_pallas_beam_step_gives_the_xla_beams(model):
  # the fused kernel (interpret mode) + its cross-beam merge pick the same 2W candidates as
  # log_softmax + lax.top_k, so hypotheses, lengths and EOS handling match; scores to rounding
  tokens, lengths = pad_prompts(PROMPTS)
  kw = dict(width=3, max_new_tokens=5, eos_ids=(3, 7), length_penalty=0.8)
  xla = beam_search_ids(model, tokens, lengths, impl="xla", **kw)
  pallas = beam_search_ids(model, tokens, lengths, impl="pallas", interpret=True, **kw)
  for name in ("tokens_BxWxN", "lengths_BxW", "finished_BxW", "steps_B"):
    np.testing.assert_array_equal(getattr(pallas, name), getattr(xla, name))
  np.testing.assert_allclose(pallas.scores_BxW, xla.scores_BxW, rtol=1e-5)
  np.testing.assert_allclose(pallas.logps_BxW, xla.logps_BxW, rtol=1e-5)
  assert np.any(xla.finished_BxW) and np.all(np.isfinite(xla.scores_BxW))
  with pytest.raises(SearchError, match="impl must be one of"):
    beam_search_ids(model, tokens, lengths, impl="triton", **kw)
  with pytest.raises(SearchError, match="width <= 16"):
    beam_search_ids(model, tokens, lengths, width=17, max_new_tokens=2, impl="pallas")


def test_beams_split_over_the_mesh_give_the_one_device_hypotheses(model):
  """Parameters on a (data 2, fsdp 2, tensor 2) mesh: the 4 prompts are searched one per batch
  shard, each with its W beams (reordered per prompt), weights gathered once: the same
  hypotheses as on one device, outputs split over data x fsdp, and the compiled search loop
  all-gathers nothing (the global-index beam reorder it replaces gathered the whole cache)."""
  import importlib  # pylint: disable=import-outside-toplevel
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  from postrl import sharding as shd  # pylint: disable=import-outside-toplevel
  from postrl.sampling.generate import cache_sharding_for, row_sharding  # pylint: disable=import-outside-toplevel
  beam = importlib.import_module("postrl.sampling.search.beam")
  mesh = shd.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  graphdef, params = nnx.split(model)
  sharded = jax.device_put(params, shd.state_shardings(params, mesh))
  tokens, lengths = pad_prompts(PROMPTS + [[20, 21, 22]])
  kw = dict(width=3, max_new_tokens=5, eos_ids=(EOS,))
  one = beam_search_ids((graphdef, params), tokens, lengths, **kw)
  split = beam_search_ids((graphdef, sharded), tokens, lengths, **kw)
  assert split.tokens_BxWxN.sharding.spec[0] == ("data", "fsdp")
  assert {s.data.shape[0] for s in split.tokens_BxWxN.addressable_shards} == {1}
  np.testing.assert_array_equal(split.tokens_BxWxN, one.tokens_BxWxN)
  np.testing.assert_array_equal(split.lengths_BxW, one.lengths_BxW)
  np.testing.assert_allclose(split.scores_BxW, one.scores_BxW, rtol=1e-5, atol=1e-5)
  kept = beam_search_ids((graphdef, sharded), tokens, lengths, split_rows=False, **kw)
  np.testing.assert_array_equal(kept.tokens_BxWxN, one.tokens_BxWxN)

  rows = row_sharding(sharded, 4)
  gathered = shd.gather_over_batch_axes(sharded)
  prompt, lens = jax.device_put((np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)),
                                rows)
  compiled = beam._beam_search.lower(  # pylint: disable=protected-access
      graphdef, gathered, prompt, lens, width=3, max_new_tokens=5, eos_ids=(EOS,), pad_id=0,
      alpha=1.0, norm="hf", impl="xla", interpret=False, rows=rows,
      cache_sharding=cache_sharding_for(rows, model.config, 12, tokens.shape[1] + 5)).compile()
  assert common.loop_launches(compiled.as_text())["by_op"].get("all-gather", 0) == 0
