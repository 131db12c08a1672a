"""Verifier-made preference data: sampling + scoring, pairs, rankings."""

import jax
import pytest
from flax import nnx

from postrl.data.records import Problem
from postrl.data.verifier import (ScoredSample, monte_carlo_step_labels, preference_pairs,
                                  rankings, reward_stats, sample_and_score, split_steps)
from postrl.models import Transformer, load_tokenizer
from tests.conftest import tiny_config


def _s(completion, reward, prompt="p"):
  return ScoredSample(prompt=prompt, completion=completion, reward=reward, num_tokens=3,
                      finished=True)


def test_pairs_prefer_the_higher_reward_and_skip_ties():
  groups = [[_s("a", 1.0), _s("b", 0.0), _s("c", 0.0)],
            [_s("x", 1.0, "q"), _s("y", 1.0, "q")],          # all equal: no preference
            [_s("same", 1.0, "r"), _s("same", 0.0, "r")]]    # identical texts are not paired
  pairs = preference_pairs(groups, pairs_per_prompt=5)
  assert {(p.chosen, p.rejected) for p in pairs} == {("a", "b"), ("a", "c")}
  assert all(p.prompt == "p" for p in pairs)
  assert len(preference_pairs(groups, pairs_per_prompt=1)) == 1
  assert preference_pairs(groups, seed=3) == preference_pairs(groups, seed=3)


def test_rankings_need_k_distinct_levels_best_first():
  group = [_s("w", 0.0), _s("x", 2.0), _s("y", 1.0), _s("z", 1.0), _s("v", 0.5)]
  ranked = rankings([group], k=4, seed=0)
  assert len(ranked) == 1
  r = ranked[0].responses
  assert r[0] == "x" and r[1] in ("y", "z") and r[2] == "v" and r[3] == "w"
  assert rankings([group], k=5) == []           # only 4 distinct reward levels
  # with min_gap 1 the 0.5 level is dropped: levels 2, 1, 0 remain
  assert rankings([group], k=4, min_gap=1.0) == []
  (three,) = rankings([group], k=3, min_gap=1.0)
  assert three.responses[0] == "x" and three.responses[1] in ("y", "z") and three.responses[2] == "w"
  with pytest.raises(ValueError, match="k must be >= 2"):
    rankings([group], k=1)


def test_reward_stats():
  stats = reward_stats([[_s("a", 1.0), _s("b", 0.0)], [_s("c", 1.0), _s("d", 1.0)]])
  assert stats["reward_mean"] == 0.75 and stats["spread_fraction"] == 0.5


def _tiny_model():
  tok = load_tokenizer("smollm2-135m-instruct")
  cfg = tiny_config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=32,
                    eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                    tie_word_embeddings=True)
  return Transformer(cfg, rngs=nnx.Rngs(0)), tok


def test_sample_and_score_with_a_tiny_model():
  model, tok = _tiny_model()
  problems = [Problem(prompt="What is 1 + 2?", answer="3"), Problem(prompt="What is 5 - 9?",
                                                                     answer="-4")]
  seen = []

  def reward_fn(completion, problem):
    seen.append(problem.answer)
    return float(len(completion) % 2)

  kwargs = dict(num_samples=3, key=jax.random.key(0), max_new_tokens=4, batch_size=4)
  out = sample_and_score(model, tok, problems, reward_fn, **kwargs)
  assert [len(g) for g in out] == [3, 3]
  assert all(s.prompt == p.prompt for g, p in zip(out, problems) for s in g)
  assert all(1 <= s.num_tokens <= 4 for g in out for s in g)
  assert sorted(seen) == ["-4"] * 3 + ["3"] * 3
  # same key, same samples; another key, (almost surely) other samples
  again = sample_and_score(model, tok, problems, reward_fn, **kwargs)
  assert [[s.completion for s in g] for g in again] == [[s.completion for s in g] for g in out]
  other = sample_and_score(model, tok, problems, reward_fn,
                           **dict(kwargs, key=jax.random.key(1)))
  assert [[s.completion for s in g] for g in other] != [[s.completion for s in g] for g in out]


def test_split_steps_drops_blank_lines():
  assert split_steps("First, 3 + 4.\n\n  \nSo 7.  \n") == ["First, 3 + 4.", "So 7."]
  assert split_steps("") == [] and split_steps("\n \n") == []


def test_monte_carlo_step_labels_hard_and_soft():
  model, tok = _tiny_model()
  problems = [Problem(prompt="What is 1 + 2?", answer="3"), Problem(prompt="q2", answer="0")]
  samples = [[_s("a\nbX\n\nc", 0.0, "What is 1 + 2?"), _s("only", 1.0, "What is 1 + 2?")],
             [_s("  \n", 0.0, "q2"), _s("u\nv", 0.5, "q2")]]
  calls = []

  def reward_fn(text, problem):
    calls.append((text, problem.answer))
    if "bX\n" in text:                 # every completion of a prefix through step 2 scores 1
      return 1.0
    return float(hash(text) % 3) - 0.5  # -0.5, 0.5 or 1.5: clipped to [0, 1]

  kwargs = dict(rollouts=3, key=jax.random.key(0), max_new_tokens=3, batch_size=4)
  hard = monte_carlo_step_labels(model, tok, problems, samples, reward_fn, **kwargs)
  # a blank solution gives no record; rollouts only for steps that are not the last
  assert [(r.prompt, r.steps) for r in hard] == [
      ("What is 1 + 2?", ("a", "bX", "c")), ("What is 1 + 2?", ("only",)), ("q2", ("u", "v"))]
  assert len(calls) == 3 * (2 + 0 + 1)
  for (text, answer), prefix in zip(calls, ["a\n"] * 3 + ["a\nbX\n"] * 3 + ["u\n"] * 3):
    assert text.startswith(prefix)    # each completion continues its own prefix
    assert answer == ("3" if prefix[0] == "a" else "0")

  def clipped(texts):
    return [min(max(float(hash(t) % 3) - 0.5, 0.0), 1.0) for t in texts]

  step1 = clipped([t for t, _ in calls[:3]])
  step_u = clipped([t for t, _ in calls[6:]])
  assert hard[0].labels == (max(step1), 1.0, 0.0)   # last step: the solution's own outcome
  assert hard[1].labels == (1.0,)
  assert hard[2].labels == (max(step_u), 0.5)
  calls.clear()
  soft = monte_carlo_step_labels(model, tok, problems, samples, reward_fn, soft=True, **kwargs)
  assert [r.steps for r in soft] == [r.steps for r in hard]   # same key: same completions
  assert soft[0].labels == pytest.approx((sum(step1) / 3, 1.0, 0.0))
  assert soft[2].labels == pytest.approx((sum(step_u) / 3, 0.5))
  # max_steps cuts solutions; a cut solution's last kept step is labelled by rollouts too
  calls.clear()
  cut = monte_carlo_step_labels(model, tok, problems, samples, reward_fn, max_steps=1, **kwargs)
  assert [r.steps for r in cut] == [("a",), ("only",), ("u",)]
  assert cut[0].labels == (max(step1),) and cut[1].labels == (1.0,)
  with pytest.raises(ValueError, match="rollouts"):
    monte_carlo_step_labels(model, tok, problems, samples, reward_fn, **dict(kwargs, rollouts=0))
