"""Smoke test of experiments/test_time_scaling/run.py on the tiny random model (--tiny): every
stage runs, is saved and reused, and the points obey what the selections guarantee (the oracle
is never below self-consistency or the reward model's pick; tokens add up)."""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _runner():
  spec = importlib.util.spec_from_file_location(
      "tts_run", os.path.join(ROOT, "experiments", "test_time_scaling", "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _points(summary, task):
  return {(p["method"], p["n"], p.get("subset")): p for p in summary["tasks"][task]["points"]}


def test_test_time_scaling_runner_tiny(tiny_model_dir, tmp_path):
  run = _runner()
  summary = run.main(["--tiny", "--model", tiny_model_dir, "--out", str(tmp_path)])
  assert (tmp_path / "test_time_scaling.png").stat().st_size > 0
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["tasks"].keys() == {"arithmetic", "countdown"}
  for task in ("arithmetic", "countdown"):
    pts = _points(summary, task)
    problems = pts[("greedy", 1, None)]["problems"]
    assert problems == 3
    for n in (1, 2, 4):
      sc, oracle = pts[("self_consistency", n, None)], pts[("bon_verifier", n, None)]
      # the verifier picks a right answer whenever one of the n samples has it
      assert oracle["accuracy"] >= sc["accuracy"]
      # the same samples: the same policy tokens, and a rule-based verifier costs none
      assert oracle["tokens"] == sc["tokens"] and oracle["generated"] == sc["generated"]
      if task == "arithmetic":
        rm, weighted = pts[("bon_rm", n, None)], pts[("weighted_bon_rm", n, None)]
        assert oracle["accuracy"] >= rm["accuracy"]
        assert rm["tokens"] > sc["tokens"] and rm["tokens"] == weighted["tokens"]
    # n samples cost n times one sample (block averages over the same 4 samples)
    one, four = pts[("self_consistency", 1, None)], pts[("self_consistency", 4, None)]
    assert four["generated"] == pytest.approx(4 * one["generated"])
    assert pts[("beam", 2, None)]["problems"] == problems
    for budget in (1, 2):  # one point per step-search width and per MCTS simulation count
      assert pts[("step_beam", budget, None)]["problems"] == 2
      assert pts[("mcts", budget, None)]["problems"] == 2
    # MCTS with progressive widening (c = 2, alpha = 0.5): its own stage and point
    assert pts[("mcts_pw", 3, None)]["problems"] == 2
    trees = summary["tasks"][task]["stats"]["trees"]
    assert trees["mcts_pw2-0.5_s3"]["problems"] == 2 and "widenings" in trees["mcts_pw2-0.5_s3"]
    assert trees["mcts_s2"]["widenings"] == 0
    assert pts[("greedy", 1, 2)]["problems"] == 2  # greedy on the step-search subset
    assert ("bon_rm", 1, None) in pts or task == "countdown"
    chooser = summary["tasks"][task]["chooser"]
    assert chooser.keys() == {"non-oracle", "all"}
    for row in chooser["non-oracle"] + chooser["all"]:
      assert len(row["picks"]) == 2 and row["problems"] == problems
      # step search and MCTS ran on 2 of the 3 problems: never on the chooser's menu
      assert not {p["method"] for p in row["picks"]} & {"step_beam", "mcts"}
    assert not {p["method"] for r in chooser["non-oracle"] for p in r["picks"]} & {"bon_verifier"}
  for stage in ("greedy", "sample", "beam_w2", "step_beam_w1", "step_beam_w2", "mcts_s1",
                "mcts_s2", "mcts_pw2-0.5_s3"):
    assert (tmp_path / "countdown" / f"{stage}.json").exists()
  with open(tmp_path / "countdown" / "mcts_pw2-0.5_s3.json") as f:
    assert json.load(f)["settings"]["widening"] == [2.0, 0.5]
  with open(tmp_path / "countdown" / "mcts_s2.json") as f:
    assert "widening" not in json.load(f)["settings"]  # stages saved before widening still match
  assert (tmp_path / "arithmetic" / "reward_model.json").exists()
  # A second call reuses every saved stage and reproduces the numbers.
  again = run.main(["--tiny", "--model", tiny_model_dir, "--out", str(tmp_path),
                    "--tasks", "arithmetic"])
  assert again["tasks"]["arithmetic"]["points"] == summary["tasks"]["arithmetic"]["points"]
  assert again["tasks"]["arithmetic"]["chooser"] == summary["tasks"]["arithmetic"]["chooser"]
  assert again["run_seconds"] < summary["run_seconds"]
  # Other settings for a saved stage are refused, not silently mixed.
  with pytest.raises(SystemExit, match="other settings"):
    run.main(["--tiny", "--model", tiny_model_dir, "--out", str(tmp_path), "--tasks",
              "arithmetic", "--stages", "greedy,sample", "--temperature", "0.3"])



def test_cross_fit_chooser_scores_each_pick_on_the_other_half():
  """Hand-made outcomes on 4 problems (halves: {0, 2} and {1, 3}): beam W=2 is right on problem
  0 only, the vote on problem 1 only, so each half's pick is wrong on the other half. Evaluating
  a pick on the half it was chosen on would give 50%; cross-fitted it is 0%."""
  run = _runner()
  greedy = [0.0, 0.0, 0.0, 0.0]

  def pt(method, n, correct, tokens):
    return run.point(method, n, correct, tokens, tokens, greedy)

  points = [
      pt("greedy", 1, greedy, [10] * 4),
      pt("beam", 2, [1.0, 0.0, 0.0, 0.0], [50] * 4),
      pt("self_consistency", 4, [0.0, 1.0, 0.0, 0.0], [60] * 4),
      pt("bon_verifier", 4, [1.0] * 4, [60] * 4),  # an oracle: only on the "all" menu
      pt("weighted_bon_rm", 16, [1.0] * 4, [400] * 4),
  ]
  # ran on 2 of the 4 problems: left off every menu, though it is right and cheap
  points.append(dict(run.point("mcts", 3, [1.0, 1.0], [5, 5], [5, 5], greedy), problems=2))
  assert run.halves(4) == ([0, 2], [1, 3])
  rows = {r["budget"]: r for r in run.cross_fit_chooser(points, [5, 100, 1000],
                                                        run.MENUS["non-oracle"], 4)}
  assert 5 not in rows  # nothing fits: greedy alone costs 10
  r = rows[100]
  assert [(p["method"], p["n"]) for p in r["picks"]] == [("beam", 2), ("self_consistency", 4)]
  assert [p["calibration_accuracy"] for p in r["picks"]] == [0.5, 0.5]
  assert [p["scored_accuracy"] for p in r["picks"]] == [0.0, 0.0]
  assert r["accuracy"] == 0.0 and r["per_problem"] == [0.0, 0.0, 0.0, 0.0]
  # tokens are those of the pick that scored each problem: the vote on even, beam on odd
  assert r["per_problem_tokens"] == [60, 50, 60, 50] and r["tokens"] == 55
  # best fixed on all 4 problems within 100 tokens: beam W=2 (25%; ties go to fewer tokens)
  assert (r["best_fixed"]["method"], r["best_fixed"]["n"]) == ("beam", 2)
  assert r["vs_best_fixed"] == pytest.approx(-0.25) and r["vs_greedy"] == 0.0
  assert [p["method"] for p in rows[1000]["picks"]] == ["weighted_bon_rm"] * 2
  assert rows[1000]["accuracy"] == 1.0 and rows[1000]["tokens"] == 400
  full = run.cross_fit_chooser(points, [100], run.MENUS["all"], 4)[0]
  assert [p["method"] for p in full["picks"]] == ["bon_verifier", "bon_verifier"]
  assert full["accuracy"] == 1.0


def test_cross_fit_chooser_checks_the_budget_on_the_calibration_half():
  """A configuration that fits the budget on the odd half only (mean 90 tokens there, 300 on the
  even half) is picked when calibrating on the odd half and scored (with its 300 tokens) on the
  even one; calibrating on the even half falls back to greedy."""
  run = _runner()
  greedy = [0.0] * 4
  points = [run.point("greedy", 1, greedy, [10] * 4, [10] * 4, greedy),
            run.point("beam", 4, [1.0] * 4, [300, 90, 300, 90], [300, 90, 300, 90], greedy)]
  r = run.cross_fit_chooser(points, [100], run.MENUS["non-oracle"], 4)[0]
  assert [p["method"] for p in r["picks"]] == ["greedy", "beam"]
  assert r["per_problem"] == [1.0, 0.0, 1.0, 0.0] and r["accuracy"] == 0.5
  assert r["per_problem_tokens"] == [300, 10, 300, 10]
  assert r["best_fixed"]["method"] == "greedy"  # beam W=4 costs 195 on all four
  assert r["vs_best_fixed"] == pytest.approx(0.5)
  assert r["vs_best_fixed_se"] == pytest.approx(math.sqrt(1 / 3 / 4))
