"""Named rewards and their weighted sum, the reward of an RL run's config.

``REWARDS`` maps a name to a reward function whose first argument is the completion text.
``combine_rewards`` computes the rewards named in ``weights`` for every completion and

    total_i = sum_name weights[name] * reward_name(completion_i, ...)

(e.g. weights = {"math": 1.0, "boxed_format": 0.1}). The other arguments of each reward are
filled by parameter name, in this order:

  1. ``options_by_name[name]``: keyword options shared by all completions
     (``math={"method": "boxed"}``, ``overlong={"max_tokens": 4096, "cache_tokens": 512}``);
  2. ``references[i]`` for a parameter called ``reference`` (``math``);
  3. ``problems[i]``: a mapping or an object with attributes holding per-example data
     (``countdown`` reads ``numbers`` and ``target``, so a ``CountdownProblem`` works as is;
     ``overlong`` reads ``num_tokens``, so pass ``{"num_tokens": n, ...}`` dicts).

``problems`` has one entry per completion: with G samples per prompt, repeat each problem G
times. A parameter with a default that no source provides keeps its default; a required one
raises ValueError naming the reward, the parameter and where it can come from.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Sequence

from postrl.rewards.countdown import countdown_reward
from postrl.rewards.format import boxed_format_reward, length_penalty, tag_format_reward
from postrl.rewards.math import math_reward


def overlong_reward(completion: str, num_tokens: int, *, max_tokens: int,
                    cache_tokens: int) -> float:
  """``length_penalty(num_tokens, ...)`` in the registry's shape (the completion is unused)."""
  del completion
  return length_penalty(num_tokens, max_tokens=max_tokens, cache_tokens=cache_tokens)


REWARDS: dict[str, Callable[..., float]] = {
    "math": math_reward,
    "countdown": countdown_reward,
    "boxed_format": boxed_format_reward,
    "tag_format": tag_format_reward,
    "overlong": overlong_reward,
}

_MISSING = object()


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> tuple[inspect.Parameter, ...]:
  """The parameters of ``fn`` after the completion."""
  return tuple(inspect.signature(fn).parameters.values())[1:]


def _field(problem, name: str):
  if problem is None:
    return _MISSING
  if isinstance(problem, Mapping):
    return problem.get(name, _MISSING)
  return getattr(problem, name, _MISSING)


def combine_rewards(completions: Sequence[str], references: Sequence[Any] | None = None, *,
                    weights: Mapping[str, float], problems: Sequence[Any] | None = None,
                    registry: Mapping[str, Callable[..., float]] = REWARDS,
                    **options_by_name: Mapping[str, Any],
                    ) -> tuple[list[float], dict[str, list[float]]]:
  """Each named reward of each completion and their weighted sum.

  Args:
    completions: [B] completion texts.
    references: [B] reference answers (for rewards with a ``reference`` parameter), or None.
    weights: reward name -> weight; every named reward is computed (weight 0 computes and
      reports a reward without adding it to the total).
    problems: [B] per-example data (mappings or objects with attributes), or None.
    registry: name -> reward function (default ``REWARDS``; pass ``{**REWARDS, "mine": fn}``
      to add one).
    **options_by_name: reward name -> dict of keyword options for it, the same for all
      examples (``math={"method": "boxed"}``).

  Returns:
    ``(total, per_name)``: ``total`` a list of B floats, ``per_name`` reward name -> list of B
    floats (in ``weights`` order).

  Raises:
    ValueError: unknown reward names (in ``weights`` or options), options for a reward not in
      ``weights`` or not among its parameters, a required argument no source provides, or
      ``references`` / ``problems`` whose length differs from ``completions``, a weight that
      is not a finite number, a reward's own ValueError on a malformed example, or a reward
      value that is not a finite number (bool, numpy and JAX scalars count as numbers); the last
      two prefixed with the reward's name and the example's index.
  """
  if not isinstance(weights, Mapping):
    raise ValueError(f"weights must be a mapping reward name -> weight (e.g. {{'math': 1.0}}), "
                     f"got {type(weights).__name__}")
  if not weights:
    raise ValueError(f"weights is empty; known rewards: {sorted(registry)}")
  for name, w in weights.items():  # a NaN weight would make every total NaN
    try:
      finite = math.isfinite(float(w))
    except (TypeError, ValueError):
      finite = False
    if not finite:
      raise ValueError(f"weights[{name!r}] must be a finite number, got {w!r}")
  if isinstance(completions, (str, bytes)):  # would be scored character by character
    raise ValueError("completions must be a sequence of completion texts, got one string")
  unknown = sorted(set(weights) - set(registry))
  if unknown:
    raise ValueError(f"unknown reward name(s) {unknown}; known: {sorted(registry)}")
  stray = sorted(set(options_by_name) - set(weights))
  if stray:
    raise ValueError(f"options given for reward(s) {stray} that are not in weights "
                     f"{sorted(weights)} (known rewards: {sorted(registry)})")
  n = len(completions)
  for label, column in (("references", references), ("problems", problems)):
    if column is not None and len(column) != n:
      raise ValueError(f"{label} has {len(column)} entries, completions has {n}")

  per_name: dict[str, list[float]] = {}
  for name in weights:
    options = options_by_name.get(name) or {}
    if not isinstance(options, Mapping):
      raise ValueError(f"options for reward {name!r} must be a dict of keyword options "
                       f"({name}={{...}}), got {options!r}")
    fn, options = registry[name], dict(options)
    params = _parameters(fn)
    bad = sorted(set(options) - {p.name for p in params})
    if bad:
      raise ValueError(f"reward {name!r} has no option(s) {bad}; its parameters: "
                       f"{[p.name for p in params]}")
    values = []
    for i, completion in enumerate(completions):
      kwargs = dict(options)
      for p in params:
        if p.name in kwargs:
          continue
        value = _MISSING
        if p.name == "reference" and references is not None:
          value = references[i]
        if value is _MISSING:
          value = _field(problems[i] if problems is not None else None, p.name)
        if value is not _MISSING:
          kwargs[p.name] = value
        elif p.default is inspect.Parameter.empty:
          raise ValueError(f"reward {name!r} needs {p.name!r} for example {i}: give it in "
                           f"{name}={{...}} options, references (for 'reference') or "
                           f"problems[i] (a mapping or object with that field)")
      try:
        value = fn(completion, **kwargs)
      except ValueError as e:  # a malformed example (e.g. a Countdown problem without numbers)
        raise ValueError(f"reward {name!r}, example {i}: {e}") from e
      # float() alone would read "1" or [1.0] as 1.0, and a NaN would make the total (and
      # every advantage of its group) NaN; numpy / JAX scalars are numbers
      number = None
      if not isinstance(value, (str, bytes)) and getattr(value, "shape", ()) == ():
        try:
          number = float(value)
        except (TypeError, ValueError):
          pass
      if number is None or not math.isfinite(number):
        raise ValueError(f"reward {name!r}, example {i}: returned {value!r}, not a finite number")
      values.append(number)
    per_name[name] = values
  total = [sum(float(weights[name]) * per_name[name][i] for name in weights) for i in range(n)]
  return total, per_name
