"""Format rewards and length shaping for RL on reasoning tasks.

``boxed_format_reward``  1 if the completion states exactly one non-empty ``\\boxed{}`` answer.
``tag_format_reward``    1 if the completion is ``<think>...</think><answer>...</answer>`` (the
                         rule-based format reward of DeepSeek-R1; DeepSeek-AI 2025, "DeepSeek-R1:
                         Incentivizing Reasoning Capability in LLMs via Reinforcement Learning",
                         §2.2.2).
``length_penalty``       DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source
                         LLM Reinforcement Learning System at Scale", §3.4, Eq. 13).

All are pure functions of one completion (or its length) returning a Python float.
"""

from __future__ import annotations

import re

from postrl.rewards.math import _boxed_contents


def boxed_format_reward(completion: str) -> float:
  """1.0 if ``completion`` holds exactly one top-level ``\\boxed{...}`` / ``\\fbox{...}`` and it is
  closed and non-empty, else 0.0.

  Rewards committing to a single final answer in the MATH convention; two boxes (hedging),
  an empty box or an unclosed one (a truncated completion) get 0. A box nested in the box
  counts once (``\\boxed{\\boxed{5}}``).
  """
  if not isinstance(completion, str):
    return 0.0
  found = _boxed_contents(completion)
  return 1.0 if len(found) == 1 and found[0] else 0.0


def tag_format_reward(completion: str, *, think_tag: str = "think",
                      answer_tag: str = "answer") -> float:
  """1.0 if ``completion`` is exactly ``<think>...</think><answer>...</answer>``, else 0.0.

  The R1 format reward (DeepSeek-AI 2025, §2.2.2): the reasoning between ``<think>`` tags,
  then the answer between ``<answer>`` tags. Here that means: each of the four tags occurs
  exactly once, in that order, only whitespace is outside them (before, between, after), and
  the answer is not blank; the reasoning may be empty (models that skip thinking emit
  ``<think>\\n\\n</think>``). Tags are case-sensitive.

  Args:
    completion: the model's text (starting with ``<think>``: a prompt that pre-fills it must
      have it prepended before scoring).
    think_tag, answer_tag: tag names, without angle brackets.
  """
  for name, tag in (("think_tag", think_tag), ("answer_tag", answer_tag)):
    if not isinstance(tag, str) or not tag or re.search(r"[\s<>/]", tag):
      raise ValueError(f"{name} must be a non-empty tag name without spaces, <, > or /, "
                       f"got {tag!r}")
  if think_tag == answer_tag:
    raise ValueError(f"think_tag and answer_tag must differ, both are {think_tag!r}")
  if not isinstance(completion, str):
    return 0.0
  tags = [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]
  if any(completion.count(t) != 1 for t in tags):  # also keeps the regex below linear
    return 0.0
  t, a = re.escape(think_tag), re.escape(answer_tag)
  m = re.fullmatch(rf"\s*<{t}>.*</{t}>\s*<{a}>(.*)</{a}>\s*", completion, re.DOTALL)
  return 1.0 if m and m.group(1).strip() else 0.0


def length_penalty(num_tokens: int, *, max_tokens: int, cache_tokens: int) -> float:
  """DAPO's soft overlong punishment of a response of ``num_tokens`` tokens.

  With L = num_tokens, L_max = max_tokens, L_cache = cache_tokens (Yu et al. 2025, Eq. 13):

    R_length(L) = 0                                  if L <= L_max - L_cache
                  ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
                  -1                                 if L > L_max

  added to the correctness reward: a linearly growing penalty inside the last ``cache_tokens``
  of the budget and -1 beyond it. DAPO uses L_max = 20480 with L_cache = 4096 (an expected
  maximum of 16384 tokens). cache_tokens = 0 is a hard step (0 up to L_max, -1 beyond).

  Args:
    num_tokens: the response length in tokens (>= 0).
    max_tokens: L_max (> 0).
    cache_tokens: L_cache, the soft punishment interval (0 <= L_cache <= L_max).
  """
  if max_tokens <= 0 or not 0 <= cache_tokens <= max_tokens:
    raise ValueError(f"need max_tokens > 0 and 0 <= cache_tokens <= max_tokens, got "
                     f"max_tokens={max_tokens}, cache_tokens={cache_tokens}")
  if num_tokens < 0:
    raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
  expected = max_tokens - cache_tokens
  if num_tokens <= expected:
    return 0.0
  if num_tokens <= max_tokens:
    return (expected - num_tokens) / cache_tokens
  return -1.0
