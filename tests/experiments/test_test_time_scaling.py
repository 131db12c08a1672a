"""Smoke test of experiments/test_time_scaling/run.py on the tiny random model (--tiny): every
stage runs, is saved and reused, and the points obey what the selections guarantee (the oracle
is never below self-consistency or the reward model's pick; tokens add up)."""

import importlib.util
import json
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
    assert pts[("step_beam", None, None)]["problems"] == 2
    assert pts[("mcts", None, None)]["problems"] == 2
    assert pts[("greedy", 1, 2)]["problems"] == 2  # greedy on the step-search subset
    assert ("bon_rm", 1, None) in pts or task == "countdown"
  for stage in ("greedy", "sample", "beam_w2", "step_beam", "mcts"):
    assert (tmp_path / "countdown" / f"{stage}.json").exists()
  assert (tmp_path / "arithmetic" / "reward_model.json").exists()
  # A second call reuses every saved stage and reproduces the numbers.
  again = run.main(["--tiny", "--model", tiny_model_dir, "--out", str(tmp_path),
                    "--tasks", "arithmetic"])
  assert again["tasks"]["arithmetic"]["points"] == summary["tasks"]["arithmetic"]["points"]
  assert again["run_seconds"] < summary["run_seconds"]
  # Other settings for a saved stage are refused, not silently mixed.
  with pytest.raises(SystemExit, match="other settings"):
    run.main(["--tiny", "--model", tiny_model_dir, "--out", str(tmp_path), "--tasks",
              "arithmetic", "--stages", "greedy,sample", "--temperature", "0.3"])
