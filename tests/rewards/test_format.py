"""Format rewards (boxed, R1 think/answer tags) and DAPO's soft overlong punishment."""

import time

import pytest

from postrl.rewards import boxed_format_reward, length_penalty, tag_format_reward


@pytest.mark.parametrize("completion, reward", [
    (r"so $\boxed{42}$.", 1.0),
    (r"\boxed{\frac{1}{2}}", 1.0),
    (r"\fbox{7}", 1.0),
    (r"\boxed{\boxed{5}}", 1.0),  # one top-level box
    (r"\boxed 5", 1.0),
    (r"\boxed{1} or \boxed{2}", 0.0),  # hedging
    (r"\boxed{}", 0.0), (r"\boxed{   }", 0.0),  # empty
    (r"\boxed{42", 0.0),  # truncated
    (r"\boxed{1} \boxed{", 0.0),
    ("42", 0.0), ("", 0.0), (None, 0.0),
])
def test_boxed_format_reward(completion, reward):
  assert boxed_format_reward(completion) == reward


@pytest.mark.parametrize("completion, reward", [
    ("<think>6 * 7 = 42</think><answer>42</answer>", 1.0),
    ("<think>\nsteps\n</think>\n<answer>\n42\n</answer>\n", 1.0),
    ("  <think>a</think>  <answer>b</answer>  ", 1.0),
    ("<think>\n\n</think><answer>42</answer>", 1.0),  # empty reasoning is allowed
    ("<think>a</think><answer>  </answer>", 0.0),  # a blank answer is not
    ("<answer>42</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a</think>", 0.0), ("<answer>42</answer>", 0.0),  # one part missing
    ("<think>a</think>text<answer>42</answer>", 0.0),  # text between
    ("Sure! <think>a</think><answer>42</answer>", 0.0),  # text before
    ("<think>a</think><answer>42</answer> Hope this helps", 0.0),  # text after
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # twice
    ("<think>a</think><think>b</think><answer>1</answer>", 0.0),
    ("<think>a<think>b</think><answer>1</answer>", 0.0),  # nested / unbalanced
    ("<think>a</think><answer>1", 0.0),  # truncated
    ("<THINK>a</THINK><ANSWER>1</ANSWER>", 0.0),  # case-sensitive
    ("", 0.0), (None, 0.0),
])
def test_tag_format_reward(completion, reward):
  assert tag_format_reward(completion) == reward


def test_tag_format_reward_custom_tags():
  text = "<reasoning>r</reasoning><solution>42</solution>"
  assert tag_format_reward(text, think_tag="reasoning", answer_tag="solution") == 1.0
  assert tag_format_reward(text) == 0.0
  # tag names are regex-escaped
  assert tag_format_reward("<a.b>r</a.b><c>1</c>", think_tag="a.b", answer_tag="c") == 1.0
  assert tag_format_reward("<axb>r</axb><c>1</c>", think_tag="a.b", answer_tag="c") == 0.0
  for bad in ("", "a b", "<think>", "a/b", None):
    with pytest.raises(ValueError, match="think_tag"):
      tag_format_reward(text, think_tag=bad)
  with pytest.raises(ValueError, match="must differ"):
    tag_format_reward(text, think_tag="x", answer_tag="x")


def test_tag_format_reward_long_inputs_are_fast():
  start = time.perf_counter()
  assert tag_format_reward("<think>" + "x" * 10**6 + "</think><answer>1</answer>") == 1.0
  assert tag_format_reward("<think>" * 10**5 + "</think><answer>1</answer>") == 0.0
  assert tag_format_reward("<think>a</think>" + " " * 10**6 + "<answer>1</answer>") == 1.0
  assert time.perf_counter() - start < 1.0


# DAPO (Yu et al. 2025): L_max = 20480, L_cache = 4096, so the penalty starts after 16384 tokens.
@pytest.mark.parametrize("num_tokens, expected", [
    (0, 0.0), (100, 0.0), (16384, 0.0),  # L <= L_max - L_cache
    (16385, -1 / 4096), (17408, -0.25), (18432, -0.5), (20479, -4095 / 4096),
    (20480, -1.0),  # L = L_max: the linear part reaches -1
    (20481, -1.0), (10**9, -1.0),  # L > L_max
])
def test_length_penalty_dapo_values(num_tokens, expected):
  assert length_penalty(num_tokens, max_tokens=20480, cache_tokens=4096) == pytest.approx(
      expected, rel=1e-12, abs=0)


def test_length_penalty_shape():
  values = [length_penalty(n, max_tokens=10, cache_tokens=4) for n in range(13)]
  assert values == [0, 0, 0, 0, 0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
  assert [length_penalty(n, max_tokens=10, cache_tokens=0) for n in (9, 10, 11)] == [0, 0, -1]
  assert [length_penalty(n, max_tokens=10, cache_tokens=10) for n in (0, 1, 5, 10, 11)] == \
      [0, -0.1, -0.5, -1.0, -1.0]


@pytest.mark.parametrize("kwargs", [
    dict(num_tokens=1, max_tokens=0, cache_tokens=0),
    dict(num_tokens=1, max_tokens=10, cache_tokens=11),
    dict(num_tokens=1, max_tokens=10, cache_tokens=-1),
    dict(num_tokens=-1, max_tokens=10, cache_tokens=2),
])
def test_length_penalty_rejects_bad_arguments(kwargs):
  num_tokens = kwargs.pop("num_tokens")
  with pytest.raises(ValueError):
    length_penalty(num_tokens, **kwargs)
