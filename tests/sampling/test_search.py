"""Decoding searches on scripted policies and scorers: selection rules, votes and their tie rule,
step beam search, MCTS, the compute-optimal chooser, token accounting and bad input."""

import importlib

import jax
import pytest

from postrl.data.records import Problem
from postrl.sampling import (CalibrationPoint, Completion, PartialSolution, RolloutValue, Scores,
                             SearchError, TokenCount, best_of_n, calibrate, choose_compute_optimal,
                             compute_optimal, mcts, self_consistency, step_beam_search, subsample)
from postrl.sampling.search import cluster_answers, select, vote

KEY = jax.random.key(0)


class FakePolicy:
  """A scripted policy. ``complete`` returns ``texts`` in turn (or ``texts(problem, prefix, j)``);
  ``next_steps`` cycles through ``tree(prefix)``, a list of (step, finished). Tokens: a row's
  prompt is 10 + len(prefix) tokens and each character of new text is one token."""
  delimiter = "\n"
  max_step_tokens = 5
  max_new_tokens = 7

  def __init__(self, texts=(), tree=None):
    self.texts, self.tree, self.calls = texts, tree, []

  def row_ids(self, problem, prefix):
    del problem
    return [0] * (10 + len(prefix))

  def _text(self, problem, prefix, j):
    if callable(self.texts):
      return self.texts(problem, prefix, j)
    return self.texts[j % len(self.texts)]

  def complete(self, problems, prefixes, n, *, key, max_new_tokens=None, temperature=None):
    del key, max_new_tokens, temperature
    prefixes = prefixes or [""] * len(problems)
    self.calls.append(("complete", len(problems) * n))
    return [[Completion(t, 10 + len(x), len(t), True)
             for t in (self._text(p, x, j) for j in range(n))] for p, x in zip(problems, prefixes)]

  def next_steps(self, problems, prefixes, k, *, key):
    del problems, key
    self.calls.append(("next_steps", len(prefixes) * k))
    out = []
    for x in prefixes:
      options = self.tree(x)
      out.append([Completion(s, 10 + len(x), len(s), f)
                  for s, f in (options[j % len(options)] for j in range(k))])
    return out


def table_scorer(table, tokens_each=0):
  """Scores a text by ``table[text]`` and charges ``tokens_each`` scorer tokens per text."""
  def score(problems, texts):
    return Scores([table[t] for t in texts], [TokenCount(scorer=tokens_each)] * len(texts))
  return score


# ------------------------------------------------------------------------------------ votes


def test_clusters_follow_answer_equivalence_in_order_of_appearance():
  assert cluster_answers(["7", "0.5", None, "1/2", "7.0", "x"]) == [0, 1, None, 1, 0, 2]


def test_vote_majority_weights_and_first_seen_tie_rule():
  assert vote([0, 1, 1, None]) == (1, {0: 1.0, 1: 2.0})
  assert vote([1, 0, 0, 1])[0] == 0        # 2-2 tie: class 0 appeared first
  assert vote([0, 1], [0.4, 0.4])[0] == 0  # weighted tie: first-seen
  assert vote([0, 1, 1], [0.9, 0.5, 0.5])[0] == 1
  assert vote([None, None]) == (None, {})
  with pytest.raises(SearchError, match="non-negative"):
    vote([0, 1], [1.0, -0.5])


# ------------------------------------------------------------------------- parallel sampling

TEXTS = ["so 12", "so 13", "so 14", "so 13"]


def test_best_of_n_picks_the_max_score_first_on_ties():
  policy = FakePolicy(TEXTS)
  scores = {"so 12": 0.1, "so 13": 0.2, "so 14": 0.9}
  (r,) = best_of_n(policy, ["q"], n=4, scorer=table_scorer(scores), key=KEY)
  assert (r.text, r.answer, r.status, r.info["chosen"]) == ("so 14", "14", "ok", 2)
  assert [c.score for c in r.candidates] == [0.1, 0.2, 0.9, 0.2]
  (r,) = best_of_n(policy, ["q"], n=4, scorer=table_scorer({**scores, "so 14": 0.2}), key=KEY)
  assert r.info["chosen"] == 1  # 0.2 three times: the first sample wins


def test_weighted_best_of_n_sums_scores_per_answer():
  policy = FakePolicy(["so 1", "so 2", "so 2.0", "so 3"])
  scores = {"so 1": 0.9, "so 2": 0.5, "so 2.0": 0.45, "so 3": 0.0}
  (plain,) = best_of_n(policy, ["q"], n=4, scorer=table_scorer(scores), key=KEY)
  (weighted,) = best_of_n(policy, ["q"], n=4, scorer=table_scorer(scores), key=KEY,
                          weighted=True)
  assert plain.answer == "1"
  assert weighted.answer == "2" and weighted.text == "so 2"  # 0.5 + 0.45 > 0.9
  assert weighted.info["votes"] == pytest.approx({"1": 0.9, "2": 0.95, "3": 0.0})
  assert weighted.strategy == "weighted_best_of_n"


def test_self_consistency_majority_tie_rule_and_reward_weighted_vote():
  (r,) = self_consistency(FakePolicy(TEXTS), ["q"], n=4, key=KEY)
  assert (r.answer, r.text, r.info["votes"]) == ("13", "so 13", {"12": 1, "13": 2, "14": 1})
  (tie,) = self_consistency(FakePolicy(["so 5", "so 4", "so 4", "so 5.0"]), ["q"], n=4, key=KEY)
  assert tie.answer == "5" and tie.text == "so 5"  # 2-2: "5" was sampled first
  scores = {"so 12": 0.1, "so 13": 0.2, "so 14": 0.9}
  (w,) = self_consistency(FakePolicy(TEXTS), ["q"], n=4, key=KEY, scorer=table_scorer(scores))
  assert w.answer == "14" and w.info["select"] == "weighted_vote"  # 0.9 > 0.2 + 0.2


def test_no_extractable_answer_is_a_clear_result():
  (r,) = self_consistency(FakePolicy(["no idea", "none"]), ["q"], n=2, key=KEY)
  assert (r.status, r.answer, r.text, r.info["votes"]) == ("no_answer", None, "no idea", {})
  (b,) = best_of_n(FakePolicy(["no idea", "hmm"]), ["q"], n=2, key=KEY,
                   scorer=table_scorer({"no idea": 0.0, "hmm": 1.0}), weighted=True)
  assert (b.status, b.answer, b.text) == ("no_answer", None, "hmm")


def test_empty_candidate_set_is_a_clear_result():
  r = select("q", "self_consistency", [], "majority")
  assert (r.status, r.text, r.answer, r.candidates, r.tokens) == (
      "no_candidates", None, None, (), TokenCount())


def test_token_accounting_is_exact_per_candidate_and_in_total():
  policy = FakePolicy(["ab 1", "abcdef 2"])
  scores = {"ab 1": 1.0, "abcdef 2": 0.0}
  r1, r2 = best_of_n(policy, ["p1", "p2"], n=3, scorer=table_scorer(scores, tokens_each=5),
                     key=KEY)
  # 3 rows of 10 prompt tokens; texts of 4, 8, 4 characters; 5 scorer tokens per text
  assert r1.tokens == TokenCount(prompt=30, generated=16, scorer=15) == r2.tokens
  assert [c.tokens.total for c in r1.candidates] == [19, 23, 19]
  assert r1.tokens.total == 61 and r1.to_json()["tokens"]["total"] == 61


def test_subsample_reselects_from_the_first_n_with_their_tokens():
  (r,) = self_consistency(FakePolicy(["so 1", "so 2", "so 2", "so 1", "so 1"]), ["q"], n=5,
                          key=KEY)
  assert r.answer == "1"
  two = subsample(r, 3)
  assert two.answer == "2" and two.info["n"] == 3
  assert two.tokens == TokenCount(prompt=30, generated=12)
  assert subsample(r, 5) == r


def test_bad_settings_and_scorers_are_clear_errors():
  policy = FakePolicy(TEXTS)
  with pytest.raises(SearchError, match="n must be an integer >= 1"):
    self_consistency(policy, ["q"], n=0, key=KEY)
  with pytest.raises(SearchError, match="needs a scorer"):
    best_of_n(policy, ["q"], n=2, scorer=None, key=KEY)
  with pytest.raises(SearchError, match="returned 1 scores for 2 items"):
    best_of_n(policy, ["q"], n=2, scorer=lambda ps, ts: [1.0], key=KEY)
  with pytest.raises(SearchError, match="non-finite"):
    best_of_n(policy, ["q"], n=2, scorer=lambda ps, ts: [float("nan")] * len(ts), key=KEY)
  with pytest.raises(SearchError, match="non-negative"):
    best_of_n(policy, ["q"], n=2, scorer=lambda ps, ts: [-1.0] * len(ts), key=KEY, weighted=True)
  with pytest.raises(SearchError, match="prompt"):
    self_consistency(policy, [3], n=1, key=KEY)


# ------------------------------------------------------------------------- step beam search


def _tree(prefix):
  """Round 0: s1..s4; from s3 / s1: two continuations each, one of which ends the solution."""
  if not prefix:
    return [("s1", False), ("s2", False), ("s3", False), ("s4", False)]
  last = prefix.rstrip("\n").split("\n")[-1]
  return [(f"{last}a", True), (f"{last}b", False)]


STEP_SCORES = {"s1": 0.7, "s2": 0.2, "s3": 0.9, "s4": 0.1, "s1a": 0.3, "s1b": 0.95, "s3a": 0.8,
               "s3b": 0.5, "s1ba": 0.6, "s1bb": 0.1}


def step_value(problems, partials):
  del problems
  return [STEP_SCORES[p.steps[-1]] for p in partials]


def test_step_beam_search_keeps_the_top_k_steps_by_score():
  policy = FakePolicy(tree=_tree)
  (r,) = step_beam_search(policy, ["q"], value_fn=step_value, key=KEY, width=2, expansions=2,
                          max_steps=3, complete_unfinished=False)
  rounds = r.info["rounds"]
  assert [(b["steps"], b["score"]) for b in rounds[0]] == [(["s3"], 0.9), (["s1"], 0.7)]
  # round 1: children of s3 and s1 scored 0.8, 0.5, 0.3, 0.95: the best two are kept
  assert [(b["steps"], b["finished"]) for b in rounds[1]] == [(["s1", "s1b"], False),
                                                              (["s3", "s3a"], True)]
  # round 2: only s1b is live; its children s1ba (finished, 0.6) and s1bb (0.1)
  assert [b["steps"] for b in rounds[2]] == [["s1", "s1b", "s1ba"], ["s1", "s1b", "s1bb"]]
  assert r.text == "s3\ns3a" and r.candidates[0].score == 0.8  # best finished solution
  assert [c.finished for c in r.candidates] == [True, True, False]
  assert policy.calls == [("next_steps", 4), ("next_steps", 4), ("next_steps", 2)]
  assert r.info["scored"] == 10
  # tokens: round 0 4 rows of 10 + 2 chars; round 1 rows of prefix "s3\n" / "s1\n" (13 tokens)
  # and 3-char steps; round 2: prefix "s1\ns1b\n" (17) and 4-char steps
  assert r.tokens == TokenCount(prompt=4 * 10 + 4 * 13 + 2 * 17, generated=8 + 12 + 8)


def test_step_beam_search_with_only_blank_steps_has_no_candidates():
  policy = FakePolicy(tree=lambda prefix: [("  ", False)])
  (r,) = step_beam_search(policy, ["q"], value_fn=step_value, key=KEY, width=2, expansions=1)
  assert r.status == "no_candidates" and r.text is None and r.tokens.generated == 4


def test_step_beam_search_keeps_live_beams_whose_expansions_are_all_blank():
  # round 0 gives two steps; every expansion after them is blank: the two beams must end as
  # unfinished candidates with their round-0 scores (they used to be dropped, leaving none)
  policy = FakePolicy(tree=lambda prefix: [("s3", False), ("s1", False)] if not prefix
                      else [(" ", False)])
  (r,) = step_beam_search(policy, ["q"], value_fn=step_value, key=KEY, width=2, expansions=1,
                          max_steps=4, complete_unfinished=False)
  assert r.status != "no_candidates"
  assert [(c.text, c.score, c.finished) for c in r.candidates] == [("s3", 0.9, False),
                                                                   ("s1", 0.7, False)]


class GreedyRecorder(FakePolicy):
  """A FakePolicy that records the temperature of each ``complete`` call."""

  def complete(self, problems, prefixes, n, *, key, max_new_tokens=None, temperature=None):
    self.calls.append(("temperature", temperature))
    return super().complete(problems, prefixes, n, key=key)


def test_step_beam_search_completes_unfinished_beams_greedily_in_one_batched_call():
  # no step ever finishes: after max_steps the live beam of each problem is completed greedily
  # (one call for both problems), split into steps and scored by the value function
  policy = GreedyRecorder(texts=["a\n\nb"], tree=lambda prefix: [("x", False)])
  scores = {"x": 0.5, "b": 0.9}
  value = lambda problems, partials: [scores[p.steps[-1]] for p in partials]
  results = step_beam_search(policy, ["q1", "q2"], value_fn=value, key=KEY, width=1,
                             expansions=1, max_steps=2)
  assert policy.calls[-2:] == [("temperature", 0.0), ("complete", 2)]
  assert [c for c in policy.calls if c[0] == "complete"] == [("complete", 2)]
  for r in results:
    (c,) = r.candidates
    assert (c.text, c.score, c.finished) == ("x\nx\na\nb", 0.9, True)
    assert c.info == {"steps": 4, "completed": True} and r.text == c.text
    assert r.info["scored"] == 3  # two rounds of one child, plus the completed solution
    # rounds: prompts 10 and 12 ("x\n"), one char each; completion: prompt 14 ("x\nx\n"), 4 chars
    assert r.tokens == TokenCount(prompt=10 + 12 + 14, generated=1 + 1 + 4)


def test_rollout_value_is_the_mean_verifier_reward_and_counts_its_tokens():
  policy = FakePolicy(texts=["7", "8", "7", "9"])
  reward = lambda text, problem: float(text.endswith(problem.answer))
  value = RolloutValue(policy, reward, rollouts=4, key=KEY)
  problem = Problem("q", "7")
  s = value([problem, problem], [PartialSolution(("x",)), PartialSolution(("x 7",), True)])
  assert s.values == [0.5, 1.0]  # two of four roll-outs reach 7; the finished one is checked
  assert s.item_tokens == [TokenCount(prompt=4 * 12, generated=4), TokenCount()]
  assert policy.calls == [("complete", 4)]
  hard = RolloutValue(policy, reward, rollouts=4, soft=False, key=KEY)
  assert hard([problem], [PartialSolution(("x",))]).values == [1.0]


# ------------------------------------------------------------------------------------- MCTS


def _game(prefix):
  """Two first steps A, B; each has two finishing continuations."""
  if not prefix:
    return [("A", False), ("B", False)]
  last = prefix.rstrip("\n").split("\n")[-1]
  return [(f"{last}1", True), (f"{last}2", True)]


GAME_VALUES = {"A": 0.5, "B": 0.4, "A1": 0.2, "A2": 0.3, "B1": 0.9, "B2": 0.8}


def game_value(problems, partials):
  del problems
  return [GAME_VALUES[p.steps[-1]] for p in partials]


def test_mcts_with_a_deterministic_value_converges_to_the_best_branch():
  policy = FakePolicy(tree=_game)
  (r,) = mcts(policy, ["q"], value_fn=game_value, key=KEY, simulations=30, branching=2,
              c_puct=1.0)
  assert r.text == "B\nB1" and r.answer == "1"
  assert r.info["expansions"] == 3  # root, A (its value looked better first), B
  assert r.info["root_visits"] == 30 - 3 + 6  # 3 expansions x 2 children + 27 terminal visits
  b, b1 = r.info["path_visits"]
  assert b > r.info["root_visits"] // 2 and b1 > (b - 1) - b1  # B over A, B1 over B2
  assert {c.text for c in r.candidates} == {"A\nA1", "A\nA2", "B\nB1", "B\nB2"}
  assert policy.calls == [("next_steps", 2)] * 3


def test_mcts_respects_its_token_budget_and_completes_an_unfinished_path():
  policy = FakePolicy(texts=["=5"], tree=lambda prefix: [("x", False), ("y", False)])
  values = lambda problems, partials: [0.5] * len(partials)
  (free,) = mcts(policy, ["q"], value_fn=values, key=KEY, simulations=6, branching=2)
  assert free.info["expansions"] == 6 and not free.info["budget_stopped"]
  assert free.info["completed"] and free.text.endswith("\n=5") and free.answer == "5"
  for budget in (60, 100, 150):
    (r,) = mcts(policy, ["q"], value_fn=values, key=KEY, simulations=6, branching=2,
                max_tokens=budget)
    assert r.tokens.total <= budget
    assert r.info["budget_stopped"] and r.info["expansions"] < 6
  (none,) = mcts(policy, ["q"], value_fn=values, key=KEY, simulations=6, branching=2,
                 max_tokens=10)
  assert none.status == "no_candidates" and none.tokens.total == 0


def test_mcts_completes_every_problem_in_one_batched_greedy_call():
  policy = GreedyRecorder(texts=["=5"], tree=lambda prefix: [("x", False), ("y", False)])
  values = lambda problems, partials: [0.5] * len(partials)
  results = mcts(policy, ["q1", "q2", "q3"], value_fn=values, key=KEY, simulations=3, branching=2)
  assert [c for c in policy.calls if c[0] == "complete"] == [("complete", 3)]
  assert ("temperature", 0.0) in policy.calls
  assert all(r.info["completed"] and r.answer == "5" for r in results)
  chosen = [c for c in results[0].candidates if c.text == results[0].text]
  assert chosen and chosen[0].finished
  # a chosen path left uncompleted (no budget) stays an unfinished candidate
  mcts_module = importlib.import_module("postrl.sampling.search.mcts")  # the name is shadowed
  root = mcts_module.Node(PartialSolution())
  leaf = mcts_module.Node(PartialSolution(("x = 5",)), parent=root, visits=1)
  root.children = [leaf]
  r = mcts_module._finish(Problem("q", "5"), root, leaf, None, TokenCount(), 1, True,
                          lambda t: t[-1])
  assert r.info["completed"] is False and r.text == "x = 5"
  assert [c.finished for c in r.candidates] == [False]


# --------------------------------------------------------------------------- compute-optimal


def test_compute_optimal_chooser_maximises_accuracy_within_the_budget():
  points = [CalibrationPoint("sc", 1, (True, False, False, False), (10, 10, 10, 10)),
            CalibrationPoint("sc", 4, (True, True, False, False), (40, 40, 40, 40)),
            CalibrationPoint("beam", 2, (True, True, False, False), (30, 30, 30, 30)),
            CalibrationPoint("sc", 16, (True, True, True, False), (160, 160, 160, 160))]
  assert choose_compute_optimal(points, 5) is None
  assert choose_compute_optimal(points, 10).n == 1
  best = choose_compute_optimal(points, 100)
  assert (best.strategy, best.n) == ("beam", 2)  # as accurate as sc@4, fewer tokens
  assert choose_compute_optimal(points, 1000).n == 16
  assert choose_compute_optimal(points, 1000, idx=[0, 1]).strategy == "beam"


def test_calibrate_reuses_one_sample_run_and_bins_by_difficulty():
  answers = {"a": ["so 1", "so 2", "so 1", "so 1"], "b": ["so 3", "so 3", "so 9", "so 9"]}
  policy = FakePolicy(texts=lambda problem, prefix, j: answers[problem.prompt][j])
  problems = [Problem("a", "1"), Problem("b", "9")]
  runs = {"sc": lambda ps, n: self_consistency(policy, ps, n=n, key=KEY)}
  choice = compute_optimal(runs, problems, ns=[1, 2, 4], budget=40, bins=2)
  assert policy.calls == [("complete", 8)]  # one run at n=4; n=1, 2 re-selected from it
  acc = {p.n: p.accuracy() for p in choice.points}
  assert acc == {1: 0.5, 2: 0.5, 4: 0.5}  # b: 3 wins the 2-2 tie at n=4 (seen first)
  assert [p.mean_tokens() for p in choice.points] == [14.0, 28.0, 56.0]
  assert choice.best.n == 1  # within 40 tokens, n=1 is as accurate and cheaper
  assert [b["pass_rate"] for b in choice.by_difficulty] == [[0.75, 0.75], [0.5, 0.5]]
  points, samples = calibrate(runs, problems, [2])
  assert list(samples) == ["sc"] and points[0].correct == (True, False)


def test_step_beam_search_keeps_distinct_partials():
  policy = FakePolicy(tree=lambda prefix: [("same", True)] if not prefix else [])
  (r,) = step_beam_search(policy, ["q"], value_fn=lambda ps, xs: [0.5] * len(xs), key=KEY,
                          width=2, expansions=2)
  assert [c.text for c in r.candidates] == ["same"] and r.info["scored"] == 4
