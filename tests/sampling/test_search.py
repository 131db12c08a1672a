"""Decoding searches on scripted policies and scorers: selection rules, votes and their tie rule,
step beam search, MCTS, the compute-optimal chooser, token accounting and bad input."""

import collections
import importlib
import math

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


class DrawPolicy(FakePolicy):
  """A scripted policy whose j-th draw from a (problem, prefix) is ``step(prompt, prefix, j)`` ->
  (text, finished), counted per problem and prefix, so what a node draws does not depend on how
  the rows of a call are laid out. Records (rows, k) of each ``next_steps`` call."""

  def __init__(self, step):
    super().__init__(texts=["=5"])
    self.step, self.drawn = step, {}

  def next_steps(self, problems, prefixes, k, *, key):
    del key
    self.calls.append(("next_steps", len(prefixes) * k, k))
    out = []
    for p, x in zip(problems, prefixes):
      row = []
      for _ in range(k):
        j = self.drawn.get((p.prompt, x), 0)
        self.drawn[(p.prompt, x)] = j + 1
        s, f = self.step(p.prompt, x, j)
        row.append(Completion(s, 10 + len(x), len(s), f))
      out.append(row)
    return out


def step_values(table, tokens_each=0):
  """Values a partial solution by ``table[its last step]``, charging ``tokens_each`` scorer
  tokens per partial."""
  def value(problems, partials):
    del problems
    return Scores([table[p.steps[-1]] for p in partials],
                  [TokenCount(scorer=tokens_each)] * len(partials))
  return value


def _answers(prompt, prefix, j):
  """Every draw from the root is a new finished answer a0, a1, ..."""
  del prompt, prefix
  return f"a{j}", True


def test_mcts_widening_adds_root_children_as_visits_grow_and_counts_every_token():
  # N(root) = S + 1 (the first expansion adds 2 visits, every later simulation 1); with
  # c = 1, alpha = 0.5 the root may draw max(2, ceil(sqrt(N))) steps, N before the simulation:
  # it widens at the simulations starting with N = 5, 10, 17 (S = 5, 10, 17).
  expected = {1: 2, 4: 2, 5: 3, 9: 3, 10: 4, 16: 4, 17: 5}
  totals = []
  for s, kids in expected.items():
    policy = DrawPolicy(_answers)
    (r,) = mcts(policy, ["q"], value_fn=step_values({f"a{j}": 0.5 for j in range(9)}, 3),
                key=KEY, simulations=s, branching=2, widening=(1.0, 0.5), extract=lambda t: t)
    assert r.info["root_children"] == kids, s
    assert r.info["widenings"] == kids - 2 and r.info["expansions"] == 1
    assert r.info["root_visits"] == s + 1  # a re-visited finished child backs up its value
    assert {c.text for c in r.candidates} == {f"a{j}" for j in range(kids)}
    # exact tokens: each draw reads a 10-token prompt and writes len(text) tokens; each new
    # child is scored once (3 tokens); re-visits and the finished choice cost nothing
    assert r.tokens == TokenCount(prompt=10 * kids, generated=2 * kids, scorer=3 * kids)
    assert sum(c[1] for c in policy.calls) == kids
    totals.append(r.tokens.total)
  assert totals == sorted(totals) and totals[-1] > totals[0]
  # without widening the root keeps its first two children: more simulations are free
  for s in (1, 17):
    (r,) = mcts(DrawPolicy(_answers), ["q"], value_fn=step_values({"a0": 0.5, "a1": 0.5}, 3),
                key=KEY, simulations=s, branching=2, extract=lambda t: t)
    assert r.info["root_children"] == 2 and r.info["widenings"] == 0
    assert r.info["root_visits"] == s + 1 and r.tokens.total == 2 * (10 + 2 + 3)


@pytest.mark.parametrize("widening,bound", [
    ((1.0, 0.5), lambda n: max(2, math.isqrt(n - 1) + 1 if n else 0)),  # ceil(sqrt(n)), integers
    ((2.0, 0.5), lambda n: max(2, math.isqrt(4 * n - 1) + 1 if n else 0))])  # ceil(2 sqrt(n))
def test_mcts_widening_bound_holds_exactly_at_every_node(monkeypatch, widening, bound):
  """A deep tree of distinct steps: at every ``next_steps`` call, the node being widened asks
  for exactly bound(N) - D steps (bound(N) = max(2, ceil(c N^alpha)), N its visits, D its draws
  so far), every node above it has drawn exactly its bound, and a first expansion asks for
  ``branching``."""
  mcts_module = importlib.import_module("postrl.sampling.search.mcts")
  created = []

  class Tracked(mcts_module.Node):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      created.append(self)

  monkeypatch.setattr(mcts_module, "Node", Tracked)
  counter, checked = [0], {"widen": 0, "deep_widen": 0, "expand": 0, "multi": 0}

  def step(prompt, prefix, j):
    del prompt, j
    counter[0] += 1
    depth = prefix.count("\n")
    return f"s{counter[0]}", counter[0] % 3 == 0 or depth == 2

  class Checking(DrawPolicy):
    def next_steps(self, problems, prefixes, k, *, key):
      ((x, rows),) = collections.Counter(x for x in prefixes for _ in range(k)).items()
      (node,) = [n for n in created if n.partial.prefix == x and not n.partial.finished]
      ancestor = node.parent
      while ancestor is not None:
        assert ancestor.draws == bound(ancestor.visits)
        ancestor = ancestor.parent
      if node.children:
        assert node.draws < bound(node.visits) and rows == bound(node.visits) - node.draws
        checked["widen"] += 1
        checked["deep_widen"] += node.parent is not None
        checked["multi"] += rows > 1
      else:
        assert rows == 2
        checked["expand"] += 1
      return super().next_steps(problems, prefixes, k, key=key)

  value = lambda problems, partials: [int(p.steps[-1][1:]) * 37 % 11 / 10 for p in partials]
  (r,) = mcts(Checking(step), ["q"], value_fn=value, key=KEY, simulations=60, branching=2,
              max_depth=3, widening=widening)
  assert checked["widen"] == r.info["widenings"] and checked["deep_widen"] > 0
  assert checked["multi"] > 0 or widening[0] == 1  # c = 2: some widenings draw two steps
  assert checked["expand"] == r.info["expansions"] > 1
  for node in created:  # distinct steps: one child per draw, never above the bound
    assert len(node.children) == node.draws <= bound(node.visits)
  assert created[0].visits >= 60 + 1  # every simulation added a visit (the first two)


def test_mcts_widening_revisits_repeated_steps_and_chooses_by_visit_count():
  # the root draws A, B, then A again and again: each repeated A is a re-visit of A (its stored
  # value), so A ends with the most visits though B's value is higher: the choice is A
  step = lambda prompt, prefix, j: ("B" if j == 1 else "A", True)
  values = {"A": 0.6, "B": 0.7}
  (r,) = mcts(DrawPolicy(step), ["q"], value_fn=step_values(values), key=KEY, simulations=6,
              branching=2, widening=(1.0, 1.0), extract=lambda t: t)
  # sim 1 expands (A, B); sim 2 re-visits B (higher PUCT); sims 3-6 widen by one draw each
  # (bound N = 3, 4, 5, 6): A every time
  assert r.info["root_children"] == 2 and r.info["widenings"] == 4
  visits = {c.text: c.info["visits"] for c in r.candidates}
  assert visits == {"A": 5, "B": 2} and r.info["root_visits"] == 7
  scores = {c.text: c.score for c in r.candidates}
  assert scores["B"] > scores["A"] and r.text == "A" and r.info["path_visits"] == [5]
  assert r.tokens == TokenCount(prompt=10 * 6, generated=6)


def test_mcts_widening_that_draws_only_blank_steps_still_counts_a_visit():
  step = lambda prompt, prefix, j: (f"a{j}" if j < 2 else "", True)
  (r,) = mcts(DrawPolicy(step), ["q"], value_fn=step_values({"a0": 1.0, "a1": 0.0}), key=KEY,
              simulations=5, branching=2, widening=(1.0, 1.0), extract=lambda t: t)
  # sim 2 re-visits a0; sims 3-5 draw one blank step each and re-visit the root with its Q
  assert r.info["root_visits"] == 6 and r.info["root_children"] == 2
  assert r.info["widenings"] == 3 and r.text == "a0"
  assert r.tokens == TokenCount(prompt=10 * 5, generated=4)


def test_mcts_widening_batches_problems_and_respects_the_budget():
  # q1's first steps are finished answers, q2's are unfinished steps with finished follow-ups:
  # the problems draw different numbers of steps in the same iteration (one row per draw) and
  # each search is the one it would be alone
  def step(prompt, prefix, j):
    if prompt == "q1":
      return f"a{j}", True
    return (f"x{j}", False) if not prefix else (f"y{j}", True)

  value = lambda problems, partials: [0.9 if p.steps[-1].endswith("1") else 0.3
                                      for p in partials]
  kw = dict(value_fn=value, key=KEY, simulations=12, branching=2, widening=(1.0, 0.5),
            extract=lambda t: t)
  policy = DrawPolicy(step)
  both = mcts(policy, ["q1", "q2"], **kw)
  alone = [mcts(DrawPolicy(step), [q], **kw)[0] for q in ("q1", "q2")]
  assert both == alone
  calls = [c for c in policy.calls if c[0] == "next_steps"]
  assert len(calls) <= 12 and any(k == 1 for _, _, k in calls)
  assert both[0].info["widenings"] > 0 and both[1].info["widenings"] > 0
  for budget in (40, 80, 150):
    results = mcts(DrawPolicy(step), ["q1", "q2"], **dict(kw, simulations=30), max_tokens=budget)
    assert all(r.tokens.total <= budget for r in results)
    assert any(r.info["budget_stopped"] for r in results)


def test_mcts_widening_default_and_bad_settings():
  mcts_module = importlib.import_module("postrl.sampling.search.mcts")
  width = mcts_module.width_bound
  assert [width(n, 2, (1.0, 0.5)) for n in (0, 1, 4, 5, 9, 10)] == [2, 2, 2, 3, 3, 4]
  assert width(50, 1, (1.1, 1.0)) == 55  # 1.1 * 50 = 55.00000000000001: not rounded up to 56
  assert width(7, 3, None) == 3 and width(7, 1, (2.5, 0.0)) == 3
  # alpha = 0 with ceil(c) <= branching never widens: exactly the search without widening
  plain = mcts(FakePolicy(tree=_game), ["q"], value_fn=game_value, key=KEY, simulations=30,
               branching=2)
  assert mcts(FakePolicy(tree=_game), ["q"], value_fn=game_value, key=KEY, simulations=30,
              branching=2, widening=(2.0, 0.0)) == plain
  for bad in ((0.0, 0.5), (1.0, 1.5), (1.0, -0.1), (float("inf"), 0.5), (1.0,), "wide", 3):
    with pytest.raises(SearchError, match="widening"):
      mcts(FakePolicy(tree=_game), ["q"], value_fn=game_value, key=KEY, widening=bad)


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
