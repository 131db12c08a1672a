"""Malformed problems and reward settings: a ValueError naming the field (and, through
``combine_rewards``, the reward and the example), never a reward of 0 for every completion."""

import math

import numpy as np
import pytest

from postrl.rewards import combine_rewards, countdown_reward, exact_match, math_reward
from postrl.rewards.countdown import evaluate_countdown_expression
from postrl.rewards.reward_model import RewardModelScorer

RIGHT = "<answer>(50 - 25) * 3 - 12 = 63</answer>"
NUMBERS = [50, 25, 3, 12]


@pytest.mark.parametrize("numbers, match", [
    ([], "'numbers' is empty"),
    (None, "'numbers' must be a list"),
    ("50 25 3 12", "'numbers' must be a list"),
    ([50.5, 25, 3, 12], "non-negative integers"),  # was truncated to 50: a right answer scored 1
    ([-50, 25, 3, 12], "non-negative integers"),
    (["50", 25, 3, 12], "non-negative integers"),
])
def test_countdown_numbers(numbers, match):
  with pytest.raises(ValueError, match=match):
    countdown_reward(RIGHT, numbers, 63)
  with pytest.raises(ValueError, match=match):
    evaluate_countdown_expression("50 - 25", numbers)


@pytest.mark.parametrize("target", ["63", None, math.nan, 63.5])
def test_countdown_target(target):
  # "63" or None scored the right answer 0, and every other one too
  with pytest.raises(ValueError, match="'target' must be an integer"):
    countdown_reward(RIGHT, NUMBERS, target)


def test_countdown_accepts_numpy_and_integral_floats():
  assert countdown_reward(RIGHT, np.array(NUMBERS), np.int64(63)) == 1.0
  assert countdown_reward(RIGHT, (50.0, 25, 3, 12), 63.0) == 1.0


@pytest.mark.parametrize("reference", [None, "", "   ", ["42"]])
def test_missing_reference_answer(reference):
  with pytest.raises(ValueError, match="reference answer"):
    math_reward("42", reference)
  with pytest.raises(ValueError, match="reference answer"):
    exact_match("42", reference)


def test_numpy_reference_is_compared_not_refused():
  assert math_reward("The answer is 42", np.int64(42)) == 1.0  # was 0: not an int / float
  assert math_reward("The answer is 0.5", np.float32(0.5)) == 1.0


def test_combine_names_the_reward_and_the_example():
  problems = [{"numbers": NUMBERS, "target": 63}, {"numbers": [], "target": 63}]
  with pytest.raises(ValueError, match=r"reward 'countdown', example 1: .*'numbers' is empty"):
    combine_rewards([RIGHT, RIGHT], weights={"countdown": 1.0}, problems=problems)
  with pytest.raises(ValueError, match=r"reward 'math', example 1: .*reference"):
    combine_rewards(["42", "42"], ["42", None], weights={"math": 1.0})


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights={"math": math.nan}), r"weights\['math'\] must be a finite number"),
    (dict(weights={"math": None}), r"weights\['math'\] must be a finite number"),
    (dict(weights=["math"]), "weights must be a mapping"),
    (dict(weights={"math": 1.0}, math="boxed"), "options for reward 'math' must be a dict"),
])
def test_combine_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    combine_rewards(["42"], ["42"], **kwargs)


def test_combine_refuses_one_string_as_completions():
  # "42" was scored as two completions, "4" and "2"
  with pytest.raises(ValueError, match="got one string"):
    combine_rewards("42", ["4", "2"], weights={"math": 1.0})


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(batch_size=-1),
                                    dict(batch_size=2.5), dict(max_len=0)])
def test_reward_model_sizes_are_checked_before_loading(tmp_path, kwargs):
  # batch_size=-1 scored nothing: score() returned [] for any number of completions
  with pytest.raises(ValueError, match="must be a positive integer"):
    RewardModelScorer(str(tmp_path / "missing"), **kwargs)


@pytest.mark.parametrize("reference", ["1,234", "\u22121234", " 1234 ", 1234, 1234.0])
def test_exact_match_reads_the_reference_like_the_completion(reference):
  # "1,234" and "−1234" (U+2212) could never be matched: every completion scored 0
  sign = "-" if isinstance(reference, str) and "\u2212" in reference else ""
  assert exact_match(f"so it is {sign}1,234", reference)
  assert exact_match(f"so it is {sign}1234", reference)
  assert not exact_match(f"so it is {sign}1235", reference)


@pytest.mark.parametrize("reference", ["$42", "forty-two", "\\frac{1}{2}", math.nan, "1/0"])
def test_exact_match_refuses_a_reference_that_is_not_a_number(reference):
  # was 0 for every completion, without a word
  with pytest.raises(ValueError, match="exact_match: answer .* is not a number"):
    exact_match("42", reference)


@pytest.mark.parametrize("value, match", [(None, "returned None"), ("1", "returned '1'"),
                                          (math.nan, "returned nan"), ([1.0], r"returned \[1.0\]"),
                                          (np.ones(1), r"returned array\(\[1.\]\)")])
def test_combine_refuses_a_reward_that_is_not_a_finite_number(value, match):
  # None was a bare TypeError from float(); "1" and [1.0] were silently read as 1.0, NaN made
  # the total (and every GRPO advantage of the group) NaN
  registry = {"mine": lambda completion: value}
  with pytest.raises(ValueError, match=rf"reward 'mine', example 0: {match}, not a finite number"):
    combine_rewards(["42"], weights={"mine": 1.0}, registry=registry)


def test_combine_accepts_bool_and_numpy_rewards():
  registry = {"b": lambda completion: completion == "42", "n": lambda completion: np.float32(0.5),
              "a": lambda completion: np.array(0.25)}
  total, per_name = combine_rewards(["42", "7"], weights={"b": 1.0, "n": 2.0, "a": 4.0},
                                    registry=registry)
  assert per_name == {"b": [1.0, 0.0], "n": [0.5, 0.5], "a": [0.25, 0.25]}
  assert total == [3.0, 2.0]


def test_reward_model_score_refuses_one_string():
  # score("ab", "cd") scored the characters: [r("c", "a"), r("d", "b")]
  scorer = object.__new__(RewardModelScorer)  # the check comes before any model is needed
  with pytest.raises(ValueError, match="completions and prompts must be sequences of texts"):
    scorer.score("ab", "cd")
  with pytest.raises(ValueError, match="completions and prompts must be sequences of texts"):
    scorer.score(["ab", "cd"], "xy")
