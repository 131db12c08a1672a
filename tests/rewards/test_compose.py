"""Reward registry and weighted combination."""

import pytest

from postrl.data import countdown_problems
from postrl.rewards import (REWARDS, boxed_format_reward, combine_rewards, countdown_reward,
                            length_penalty, math_reward, tag_format_reward)


def test_registry_holds_the_functions():
  assert REWARDS["math"] is math_reward
  assert REWARDS["countdown"] is countdown_reward
  assert REWARDS["boxed_format"] is boxed_format_reward
  assert REWARDS["tag_format"] is tag_format_reward
  assert REWARDS["overlong"]("ignored", 18432, max_tokens=20480, cache_tokens=4096) == \
      length_penalty(18432, max_tokens=20480, cache_tokens=4096) == -0.5


COMPLETIONS = [r"so \boxed{42}", r"\boxed{41}", "the answer is 42", r"\boxed{1} \boxed{42}"]
REFERENCES = ["42", "42", "42", "42"]


def test_weighted_sum_and_per_name():
  total, per = combine_rewards(COMPLETIONS, REFERENCES, weights={"math": 1.0, "boxed_format": 0.1})
  assert list(per) == ["math", "boxed_format"]
  assert per["math"] == [1.0, 0.0, 1.0, 1.0]
  assert per["boxed_format"] == [1.0, 1.0, 0.0, 0.0]
  assert total == pytest.approx([1.1, 0.1, 1.0, 1.0], rel=1e-12)
  assert all(type(x) is float for x in total + per["math"])


def test_weights_scale_linearly_and_zero_weight_only_reports():
  _, per = combine_rewards(COMPLETIONS, REFERENCES, weights={"math": 1.0, "boxed_format": 1.0})
  total, per2 = combine_rewards(COMPLETIONS, REFERENCES,
                                weights={"math": 2.0, "boxed_format": -0.5})
  assert per2 == per
  assert total == pytest.approx([2 * m - 0.5 * b for m, b in zip(per["math"], per["boxed_format"])])
  total, per3 = combine_rewards(COMPLETIONS, REFERENCES, weights={"math": 1.0, "boxed_format": 0.0})
  assert total == per["math"] and per3["boxed_format"] == per["boxed_format"]


def test_options_reach_the_reward():
  completions = [r"\boxed{1}, the answer is 2"]
  total, _ = combine_rewards(completions, ["2"], weights={"math": 1.0})
  assert total == [0.0]  # auto: the box decides
  total, _ = combine_rewards(completions, ["2"], weights={"math": 1.0}, math={"method": "tag"})
  assert total == [1.0]
  text = ["<r>x</r><s>1</s>"]
  assert combine_rewards(text, weights={"tag_format": 1.0})[0] == [0.0]
  assert combine_rewards(text, weights={"tag_format": 1.0},
                         tag_format={"think_tag": "r", "answer_tag": "s"})[0] == [1.0]


def test_per_example_data_from_problems():
  problems = countdown_problems(4, seed=0)
  completions = [f"<think>ok</think><answer>{p.solution} = {p.target}</answer>" for p in problems]
  completions[1] = completions[1].replace(str(problems[1].target), str(problems[1].target + 1))
  total, per = combine_rewards(completions, weights={"countdown": 1.0, "tag_format": 0.5},
                               problems=problems)  # CountdownProblem objects: attributes
  assert per["countdown"] == [1.0, 0.0, 1.0, 1.0]
  assert total == [1.5, 0.5, 1.5, 1.5]
  as_dicts = [{"numbers": p.numbers, "target": p.target} for p in problems]  # mappings
  assert combine_rewards(completions, weights={"countdown": 1.0}, problems=as_dicts)[1] == \
      {"countdown": per["countdown"]}


def test_overlong_reads_num_tokens_per_example():
  total, per = combine_rewards(
      [r"\boxed{42}"] * 3, ["42"] * 3, weights={"math": 1.0, "overlong": 1.0},
      problems=[{"num_tokens": n} for n in (10, 14, 20)],
      overlong={"max_tokens": 16, "cache_tokens": 4})
  assert per["overlong"] == [0.0, -0.5, -1.0]
  assert total == [1.0, 0.5, 0.0]


def test_custom_registry():
  registry = {**REWARDS, "length": lambda completion: float(len(completion))}
  total, _ = combine_rewards(["ab", r"\boxed{3}"], ["3", "3"], weights={"length": 0.5, "math": 1.0},
                             registry=registry)
  assert total == [1.0, 5.5]


def test_errors():
  with pytest.raises(ValueError, match=r"unknown reward name\(s\) \['mth'\].*known: \[.*'math'"):
    combine_rewards(COMPLETIONS, REFERENCES, weights={"mth": 1.0, "boxed_format": 0.1})
  with pytest.raises(ValueError, match="weights is empty"):
    combine_rewards(COMPLETIONS, REFERENCES, weights={})
  with pytest.raises(ValueError, match=r"not in weights"):
    combine_rewards(COMPLETIONS, REFERENCES, weights={"math": 1.0}, boxed_format={})
  with pytest.raises(ValueError, match=r"has no option\(s\) \['methd'\]"):
    combine_rewards(COMPLETIONS, REFERENCES, weights={"math": 1.0}, math={"methd": "tag"})
  with pytest.raises(ValueError, match="'math' needs 'reference'"):
    combine_rewards(COMPLETIONS, weights={"math": 1.0})
  with pytest.raises(ValueError, match="'countdown' needs 'numbers'"):
    combine_rewards(COMPLETIONS, REFERENCES, weights={"countdown": 1.0})
  with pytest.raises(ValueError, match="references has 3 entries, completions has 4"):
    combine_rewards(COMPLETIONS, REFERENCES[:3], weights={"math": 1.0})
  with pytest.raises(ValueError, match="problems has 1 entries"):
    combine_rewards(COMPLETIONS, REFERENCES, weights={"math": 1.0}, problems=[{}])
  with pytest.raises(ValueError, match="cache_tokens"):  # a reward's own validation propagates
    combine_rewards(["x"], weights={"overlong": 1.0}, problems=[{"num_tokens": 1}],
                    overlong={"max_tokens": 4, "cache_tokens": 8})


def test_empty_batch():
  assert combine_rewards([], [], weights={"math": 1.0}) == ([], {"math": []})
