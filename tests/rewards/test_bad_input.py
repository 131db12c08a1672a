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
