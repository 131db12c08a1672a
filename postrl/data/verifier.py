"""Preference data from a verifier: sample the model, score the samples, pair or rank them.

    samples = sample_and_score(model, tokenizer, problems, reward_fn, num_samples=8, key=key)
    pairs = preference_pairs(samples, seed=0)      # PreferenceRecord: a correct vs an incorrect
    ranked = rankings(samples, k=4, seed=0)         # RankingRecord: K responses, best first
    steps = monte_carlo_step_labels(model, tokenizer, problems, samples, reward_fn,
                                    rollouts=8, key=key)  # StepRecord: PRM labels per step

This is how the surveys' "data from verifiers" is built for reward models (Bradley-Terry,
Plackett-Luce) and the DPO family when no human labels exist: the model's own completions on a
task with an exact checker (``postrl.rewards``), the better-scored ones preferred (as in
RLHF-by-verifier pipelines, e.g. Lightman et al. 2023 for outcome labels, and the "on-policy
preference pairs" of iterative DPO, Xu et al. 2023). Step labels for process reward models
come from the same verifier by completing each step prefix several times (Math-Shepherd, Wang et
al. 2024).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

import jax
import numpy as np

from postrl.data.preference import StepRecord
from postrl.data.records import PreferenceRecord, RankingRecord
from postrl.sampling.generate import generate, pad_prompts, stop_and_pad_ids, to_host


@dataclasses.dataclass(frozen=True)
class ScoredSample:
  """One sampled completion with its verifier reward."""
  prompt: str
  completion: str
  reward: float
  num_tokens: int
  finished: bool  # ended with an EOS token (False: cut at max_new_tokens)


def sample_and_score(model, tokenizer, problems: Sequence, reward_fn: Callable[[str, object], float],
                     *, num_samples: int, key, max_new_tokens: int = 64, temperature: float = 1.0,
                     top_p: float | None = None, batch_size: int = 16,
                     system_prompt: str | None = None) -> list[list[ScoredSample]]:
  """``num_samples`` completions of each problem's prompt, each scored by ``reward_fn``.

  Args:
    model: a ``Transformer`` (or ``(graphdef, params)``).
    tokenizer: its tokenizer; prompts go through its chat template as a user turn.
    problems: objects with a ``prompt`` attribute (``Problem``, ``CountdownProblem``, ...).
    reward_fn: ``(completion, problem) -> float``, e.g.
      ``lambda c, p: postrl.rewards.math_reward(c, p.answer)``.
    num_samples: completions per prompt.
    key: PRNG key; the same key gives the same samples.
    max_new_tokens, temperature, top_p: sampling settings (``postrl.sampling.generate``).
    batch_size: rows per ``generate`` call (the last batch is padded to keep one compilation).
    system_prompt: an optional system message before each prompt.
  Returns:
    One list per problem, ``num_samples`` ``ScoredSample`` each, in sampling order.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  eos, pad = stop_and_pad_ids(model if not isinstance(model, tuple) else
                              _merged(model), tokenizer)
  system = [{"role": "system", "content": system_prompt}] if system_prompt else []
  prompt_ids = [tokenizer.encode_chat(system + [{"role": "user", "content": p.prompt}])
                for p in problems]
  owners = [i for i in range(len(problems)) for _ in range(num_samples)]
  continuations = _complete(model, [prompt_ids[i] for i in owners], key=key,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            batch_size=batch_size, eos=eos, pad=pad)
  out: list[list[ScoredSample]] = [[] for _ in problems]
  for i, (ids, finished) in zip(owners, continuations):
    completion = tokenizer.decode(ids)
    out[i].append(ScoredSample(prompt=problems[i].prompt, completion=completion,
                               reward=float(reward_fn(completion, problems[i])),
                               num_tokens=len(ids), finished=finished))
  return out


def _complete(model, id_rows: Sequence[Sequence[int]], *, key, max_new_tokens: int,
              temperature: float, top_p: float | None, batch_size: int, eos, pad: int
              ) -> list[tuple[np.ndarray, bool]]:
  """One sampled continuation ``(new ids, ended with EOS)`` per row of prompt ids, in order;
  rows go through ``generate`` ``batch_size`` at a time (the last batch padded with copies so
  there is one compilation), batch b with ``fold_in(key, b * batch_size)``."""
  out = []
  for start in range(0, len(id_rows), batch_size):
    chunk = list(id_rows[start:start + batch_size])
    ids = chunk + [chunk[-1]] * (batch_size - len(chunk))
    tokens, lengths = pad_prompts(ids, pad_id=pad, multiple=16)
    res = generate(model, tokens, lengths, key=jax.random.fold_in(key, start),
                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   eos_ids=eos, pad_id=pad)
    toks, lens, done = to_host(res.tokens_BxN), to_host(res.lengths_B), to_host(res.finished_B)
    out += [(toks[b, :lens[b]], bool(done[b])) for b in range(len(chunk))]
  return out


def _merged(model_pair):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.merge(*model_pair)


def preference_pairs(samples: Sequence[Sequence[ScoredSample]], *, pairs_per_prompt: int = 1,
                     min_gap: float = 1e-6, seed: int = 0) -> list[PreferenceRecord]:
  """Pairs (chosen, rejected) from each prompt's samples with reward(chosen) - reward(rejected)
  >= ``min_gap``; prompts whose samples all score the same give no pair (they carry no
  preference). Up to ``pairs_per_prompt`` distinct pairs per prompt, drawn with ``seed``;
  identical completions are never paired with each other.
  """
  rng = random.Random(seed)
  pairs = []
  for group in samples:
    candidates = [(a, b) for a in group for b in group
                  if a.reward - b.reward >= min_gap and a.completion != b.completion]
    rng.shuffle(candidates)
    seen = set()
    for a, b in candidates:
      if (a.completion, b.completion) in seen:
        continue
      seen.add((a.completion, b.completion))
      pairs.append(PreferenceRecord(prompt=a.prompt, chosen=a.completion, rejected=b.completion))
      if len(seen) >= pairs_per_prompt:
        break
  return pairs


def rankings(samples: Sequence[Sequence[ScoredSample]], *, k: int, seed: int = 0,
             min_gap: float = 1e-6) -> list[RankingRecord]:
  """K responses per prompt ordered best first, with strictly decreasing rewards (each at least
  ``min_gap`` below the previous), so the ranking is fully determined by the verifier. A prompt
  without K distinct reward levels among its distinct completions gives no ranking; with binary
  rewards use a graded reward (e.g. correctness plus format plus a length term) for K > 2.
  """
  if k < 2:
    raise ValueError(f"k must be >= 2, got {k}")
  rng = random.Random(seed)
  out = []
  for group in samples:
    by_level: dict[float, list[ScoredSample]] = {}
    for s in group:
      by_level.setdefault(s.reward, []).append(s)
    levels = sorted(by_level, reverse=True)
    chosen_levels = [levels[0]] if levels else []
    for level in levels[1:]:
      if chosen_levels[-1] - level >= min_gap:
        chosen_levels.append(level)
    if len(chosen_levels) < k:
      continue
    picked_levels = sorted(rng.sample(chosen_levels, k), reverse=True)
    responses = []
    for level in picked_levels:
      responses.append(rng.choice(by_level[level]).completion)
    if len(set(responses)) == k:
      out.append(RankingRecord(prompt=group[0].prompt, responses=tuple(responses)))
  return out


def reward_stats(samples: Sequence[Sequence[ScoredSample]]) -> dict[str, float]:
  """Mean reward, the fraction of prompts with any reward spread (usable for pairs / GRPO),
  the fraction of samples that finished with EOS, and the mean completion length."""
  flat = [s for g in samples for s in g]
  if not flat:
    return {"reward_mean": 0.0, "spread_fraction": 0.0, "finished_fraction": 0.0,
            "tokens_mean": 0.0}
  return {
      "reward_mean": float(np.mean([s.reward for s in flat])),
      "spread_fraction": float(np.mean([len({s.reward for s in g}) > 1 for g in samples])),
      "finished_fraction": float(np.mean([s.finished for s in flat])),
      "tokens_mean": float(np.mean([s.num_tokens for s in flat])),
  }


def split_steps(completion: str) -> list[str]:
  """The reasoning steps of a completion: its non-blank lines, trailing whitespace removed (the
  inverse of the newline join that ``postrl.data.preference.tokenize_steps`` applies)."""
  return [line.rstrip() for line in completion.split("\n") if line.strip()]


def monte_carlo_step_labels(model, tokenizer, problems: Sequence,
                            samples: Sequence[Sequence[ScoredSample]],
                            reward_fn: Callable[[str, object], float], *, rollouts: int, key,
                            soft: bool = False, max_steps: int | None = None,
                            max_new_tokens: int = 64, temperature: float = 1.0,
                            top_p: float | None = None, batch_size: int = 16,
                            system_prompt: str | None = None) -> list[StepRecord]:
  """Step labels for a process reward model by Monte-Carlo completion (Math-Shepherd).

  Each sampled solution is split into steps s_1..s_n (``split_steps``). The quality of step j is
  estimated by completing the prefix s_1..s_j ``rollouts`` times from the same model and scoring
  each completion with the outcome verifier, r_i = clip(reward_fn(s_1..s_j + completion_i), 0, 1):

      hard estimation (HE)   y_j = max_i r_i      (1 if any completion reaches the answer)
      soft estimation (SE)   y_j = mean_i r_i     (``soft=True``)

  The last step's label is the solution's own outcome, clip(reward, 0, 1) (no rollouts needed).
  Wang et al. 2024, "Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human
  Annotations" (Eqs. 3-4); the automatic alternative to the human step labels of Lightman et al.
  2023 (PRM800K). Labels are in [0, 1], as ``postrl.losses.process_reward`` expects.

  Args:
    model, tokenizer: the completer (usually the policy that wrote ``samples``).
    problems: the problems of ``samples`` (same order); ``reward_fn(text, problem)`` scores a
      full solution text.
    samples: per problem, the solutions to label (``sample_and_score``'s output).
    rollouts: completions per step prefix (Math-Shepherd uses N = 8).
    key: PRNG key; the same key gives the same labels.
    soft: SE instead of HE.
    max_steps: keep at most this many leading steps of each solution (the kept steps still get
      rollout labels when the solution continues past them).
    max_new_tokens, temperature, top_p, batch_size, system_prompt: as ``sample_and_score``.
  Returns:
    One ``StepRecord`` per solution with at least one step, in order.
  """
  if rollouts < 1:
    raise ValueError(f"rollouts must be >= 1, got {rollouts}")
  if len(samples) != len(problems):
    raise ValueError(f"{len(samples)} sample groups for {len(problems)} problems")
  eos, pad = stop_and_pad_ids(model if not isinstance(model, tuple) else
                              _merged(model), tokenizer)
  system = [{"role": "system", "content": system_prompt}] if system_prompt else []
  solutions, rows, owners = [], [], []  # owners[r] = (solution index, step index, prefix text)
  for problem, group in zip(problems, samples):
    prompt_ids = list(tokenizer.encode_chat(system + [{"role": "user", "content": problem.prompt}]))
    for sample in group:
      all_steps = split_steps(sample.completion)
      steps = all_steps[:max_steps] if max_steps else all_steps
      if not steps:
        continue
      n = len(solutions)
      solutions.append((problem, sample, steps, len(steps) == len(all_steps)))
      for j in range(len(steps) - (1 if len(steps) == len(all_steps) else 0)):
        prefix = "\n".join(steps[:j + 1]) + "\n"
        ids = prompt_ids + list(tokenizer.encode(prefix, add_bos=False))
        rows += [ids] * rollouts
        owners += [(n, j, prefix)] * rollouts
  continuations = _complete(model, rows, key=key, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, batch_size=batch_size,
                            eos=eos, pad=pad) if rows else []
  scores: dict[tuple[int, int], list[float]] = {}
  for (n, j, prefix), (ids, _) in zip(owners, continuations):
    text = prefix + tokenizer.decode(ids)
    r = float(np.clip(reward_fn(text, solutions[n][0]), 0.0, 1.0))
    scores.setdefault((n, j), []).append(r)
  out = []
  for n, (_, sample, steps, complete) in enumerate(solutions):
    labels = []
    for j in range(len(steps)):
      if complete and j == len(steps) - 1:
        labels.append(float(np.clip(sample.reward, 0.0, 1.0)))
      else:
        r = scores[(n, j)]
        labels.append(float(np.mean(r)) if soft else max(r))
    out.append(StepRecord(prompt=sample.prompt, steps=tuple(steps), labels=tuple(labels)))
  return out
