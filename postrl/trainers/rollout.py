"""On-policy rollouts shared by the RL trainers (GRPO family, PPO): sample completions with the
current parameters, score them, lay them out as training rows, and serve them as mini-batches.

One *rollout* is R = prompts x group_size sampled completions. It feeds
``epochs x minibatches`` optimizer steps (PPO's "several mini-batch epochs per rollout", GRPO's
μ updates with old log-probs): each epoch is a fresh seeded permutation of the R rows cut into
``minibatches`` equal mini-batches. The loop (``postrl.trainers.loop.fit``) asks for one
mini-batch per step with ``next_batch(params, step)``; a new rollout is sampled with the params
of the step that needs it.

Rows. Row i is its prompt followed by its completion, right-padded to a fixed length
T = prompt_len + max_new_tokens, with

    tokens[i]        prompt ids, completion ids (EOS included when produced), pad
    segment_ids[i]   1 on prompt and completion, 0 on padding
    loss_mask[i]     1 on completion tokens only
    sampler_logps[i] the sampler's log-prob of each completion token under the plain model
                     (``GenerateOutput.model_logps_BxN``) at the same positions, 0 elsewhere

so ``postrl.logprobs.token_logps(..., tokens, loss_mask)`` recomputes exactly the quantities the
sampler reported (their difference is logged as ``rollout/logp_mismatch``).

The sampler splits each batch of rows over the mesh's batch axes (``generate``'s data-parallel
decoding: each device decodes its share) and every process gets the whole rollout back
(``to_host``) and scores it, so the global mini-batch is the same whatever the number of
processes; each process then keeps its own contiguous share of the rows, as
``postrl.data.pipeline`` does for SFT.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from typing import Callable, Sequence

import jax
import numpy as np

from postrl import sharding as shd
from postrl.logprobs import token_logps
from postrl.rewards import combine_rewards
from postrl.sampling.continuous import generate_continuous
from postrl.sampling.generate import generate, to_host
from postrl.trainers.loop import NonFiniteError


def rows_per_rollout(rollout_cfg) -> int:
  """prompts x group_size, checked to split into ``minibatches`` (ConfigError otherwise, or when
  prompts, group_size, minibatches or epochs is not a positive integer)."""
  from postrl.models import ConfigError  # pylint: disable=import-outside-toplevel
  for key in ("prompts", "group_size", "minibatches", "epochs"):
    value = rollout_cfg.get(key, 1)
    if not (isinstance(value, numbers.Integral) and value >= 1):
      raise ConfigError(f"config.rollout.{key} must be an integer >= 1, got {value!r}")
  rows = rollout_cfg.prompts * rollout_cfg.group_size
  if rows % rollout_cfg.minibatches:
    raise ConfigError(f"config.rollout: prompts x group_size = {rows} rows do not split into "
                      f"minibatches={rollout_cfg.minibatches}")
  return rows


def encode_prompts(tokenizer, prompts: Sequence[str], *, system_prompt: str | None = None):
  """Chat-template token ids of each prompt as a user turn (after an optional system turn)."""
  system = [{"role": "system", "content": system_prompt}] if system_prompt else []
  return [tokenizer.encode_chat(system + [{"role": "user", "content": p}]) for p in prompts]


def assemble_rows(prompt_ids: Sequence[Sequence[int]], completions_BxN, lengths_B,
                  sampler_logps_BxN, *, prompt_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Training rows [B, prompt_len + N] from prompts and their sampled completions (module doc).

  ``completions_BxN[b, :lengths_B[b]]`` are row b's completion tokens; ``prompt_len`` must be at
  least the longest prompt, so every row has the same shape whatever was sampled.
  """
  completions_BxN = np.asarray(completions_BxN)
  B, N = completions_BxN.shape
  if len(prompt_ids) != B:
    raise ValueError(f"{len(prompt_ids)} prompts for {B} completions")
  longest = max(len(p) for p in prompt_ids)
  if longest > prompt_len:
    raise ValueError(f"a prompt has {longest} tokens, more than prompt_len={prompt_len}")
  T = prompt_len + N
  tokens = np.full((B, T), pad_id, np.int32)
  segment_ids = np.zeros((B, T), np.int32)
  loss_mask = np.zeros((B, T), np.float32)
  logps = np.zeros((B, T), np.float32)
  for b, prompt in enumerate(prompt_ids):
    p, n = len(prompt), int(lengths_B[b])
    tokens[b, :p] = prompt
    tokens[b, p:p + n] = completions_BxN[b, :n]
    segment_ids[b, :p + n] = 1
    loss_mask[b, p:p + n] = 1.0
    logps[b, p:p + n] = np.asarray(sampler_logps_BxN[b, :n])
  return dict(tokens=tokens, segment_ids=segment_ids, loss_mask=loss_mask, sampler_logps=logps)


def trim_rows(rows: dict[str, np.ndarray], *, prompt_len: int, bucket: int) -> dict:
  """Drops trailing all-padding columns, keeping a width of ``prompt_len + k * bucket``: short
  completions then cost short training rows, and only a few distinct widths are compiled."""
  T = rows["tokens"].shape[1]
  used = int(rows["segment_ids"].sum(axis=1).max())
  width = min(T, prompt_len + -(-max(used - prompt_len, 1) // bucket) * bucket)
  return {k: (v[:, :width] if v.ndim == 2 and v.shape[1] == T else v) for k, v in rows.items()}


def score_completions(texts: Sequence[str], problems: Sequence, lengths, *, weights: dict,
                      options: dict, reward_model=None, reward_model_weight: float = 1.0):
  """Rewards of sampled completions: ``postrl.rewards.combine_rewards`` over the named rewards
  (the problem's fields and ``num_tokens`` fill their arguments) plus, with ``reward_model``
  (``postrl.rewards.make_reward_model_reward``), ``reward_model_weight`` x its score, computed
  in batches. Returns (total [B] float32, per-name arrays, "reward_model" included); a reward
  that is NaN or Inf is a ``NonFiniteError`` naming it and the completion."""
  inputs = []
  for p, n in zip(problems, lengths):
    fields = dataclasses.asdict(p) if dataclasses.is_dataclass(p) else dict(p)
    inputs.append(dict(fields, num_tokens=int(n)))
  total, per_name = ([0.0] * len(texts), {}) if not weights else combine_rewards(
      texts, [p.answer for p in problems], weights=weights, problems=inputs, **options)
  total = np.array(total, np.float32)
  per_name = {k: np.array(v, np.float32) for k, v in per_name.items()}
  if reward_model is not None:
    scores = np.array(reward_model.batch(list(texts), [p.prompt for p in problems]), np.float32)
    if scores.shape != total.shape:  # numpy would broadcast a [1] or [B, 1] silently
      raise ValueError(f"the reward model returned scores of shape {scores.shape} for "
                       f"{len(texts)} completions; expected ({len(texts)},)")
    per_name["reward_model"] = scores
    total = total + reward_model_weight * scores
  # a NaN reward would only surface later as a NaN loss (or, with DAPO's dynamic sampling, a
  # silently dropped group): name the reward and the completion here
  for name, values in list(per_name.items()) + [("total (weighted sum)", total)]:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      i = int(bad[0])
      raise NonFiniteError(f"reward {name!r} is {values[i]} for completion {i} of the rollout "
                           f"(prompt {getattr(problems[i], 'prompt', None)!r}, completion "
                           f"{texts[i][:200]!r}); "
                           f"{bad.size} of {len(values)} rewards are not finite")
  return total, per_name


def load_reward_model_reward(rm_cfg):
  """``config.reward_model`` (path, weight, batch_size) -> the batched reward, or None."""
  if not rm_cfg or not rm_cfg.get("path"):
    return None
  from postrl.rewards import make_reward_model_reward  # pylint: disable=import-outside-toplevel
  return make_reward_model_reward(rm_cfg.path, batch_size=rm_cfg.get("batch_size") or 16)


def sample(graphdef, params, prompt_ids: Sequence[Sequence[int]], *, key, prompt_len: int,
           max_new_tokens: int, temperature: float, top_p: float | None, eos_ids, pad_id: int,
           batch_size: int | None = None, sampling_impl: str = "auto",
           continuous: bool = False) -> dict[str, np.ndarray]:
  """Samples one completion per prompt (prompts padded to ``prompt_len``: one compilation) in
  batches of ``batch_size`` rows -> host arrays ``completions``, ``lengths``, ``finished``,
  ``sampler_logps`` (plain-model log-probs of the sampled tokens). ``sampling_impl``: as
  ``generate``'s ("xla", or the sampling kernel with "auto" / "pallas"). ``continuous``: one
  ``generate_continuous`` call with ``batch_size`` slots instead, a row that ends (EOS) handing
  its slot to a queued prompt (``rollout.continuous`` in the GRPO / PPO configs): a gain only
  when there are more prompts than slots; the slots are not split over the mesh's batch axes."""
  n = len(prompt_ids)
  batch_size = batch_size or n
  settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  eos_ids=eos_ids, pad_id=pad_id, sampling_impl=sampling_impl)

  def padded(rows):  # right-padded to prompt_len: one compiled shape
    tokens = np.full((len(rows), prompt_len), pad_id, np.int32)
    for i, ids in enumerate(rows):
      tokens[i, :len(ids)] = ids
    return tokens, np.array([len(ids) for ids in rows], np.int32)

  def on_host(res, real):
    return dict(completions=to_host(res.tokens_BxN)[:real], lengths=to_host(res.lengths_B)[:real],
                finished=to_host(res.finished_B)[:real],
                sampler_logps=to_host(res.model_logps_BxN)[:real])

  if continuous:
    return on_host(generate_continuous((graphdef, params), *padded(prompt_ids),
                                       slots=min(batch_size, n), key=key, **settings), n)
  parts = []
  for start in range(0, n, batch_size):
    chunk = list(prompt_ids[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)  # fixed shape for the last batch
    parts.append(on_host(generate((graphdef, params), *padded(chunk),
                                  key=jax.random.fold_in(key, start), **settings), real))
  return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def logps_fn(apply_fn, *, mesh, vocab_chunk: int | None = None, chunk: int | None = None,
             rows_per_call: int | None = None):
  """``f(params, rows) -> logps [R, T]`` on host: the per-token log-probs of rollout rows under
  ``params`` (old-policy and reference log-probs), jitted once, rows sharded over the mesh's
  batch axes, ``rows_per_call`` rows at a time (bounds the activation memory)."""
  rows_sharding = shd.batch_sharding(mesh)

  @jax.jit
  def compute(params, tokens, mask, segment_ids):
    return token_logps(apply_fn, params, tokens, mask, chunk=chunk, vocab_chunk=vocab_chunk,
                       segment_ids_BxT=segment_ids)

  def f(params, rows: dict) -> np.ndarray:
    R = rows["tokens"].shape[0]
    step = rows_per_call or R
    out = []
    for s in range(0, R, step):
      part = {k: rows[k][s:s + step] for k in ("tokens", "loss_mask", "segment_ids")}
      n = part["tokens"].shape[0]
      shards = shd.batch_shards(mesh)
      pad = (-n) % shards
      if pad:  # keep rows divisible by the batch shards
        part = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in part.items()}
      part = shd.put_global(part, {k: rows_sharding for k in part})
      out.append(to_host(compute(params, part["tokens"], part["loss_mask"],
                                 part["segment_ids"]))[:n])
    return np.concatenate(out)

  return f


class RolloutSource:
  """Serves mini-batches of on-policy rollouts to ``fit`` (see the module docstring).

  Args:
    make_rollout: ``(params, rollout_index) -> (rows, metrics)``: the global rollout as host
      arrays with R rows (identical on every process) and host scalar metrics about it.
    rows_per_rollout: R.
    minibatches: mini-batches per epoch (R must divide).
    epochs: passes over each rollout.
    seed: seeds the row permutations.
  Resuming: the position (rollout index, mini-batch) is checkpointed. A run stopped in the middle
  of a rollout resumes by sampling that rollout again with the checkpointed params (RL cannot
  replay the interrupted rollout without storing it); stopping on a rollout boundary, as
  checkpoints every multiple of ``epochs * minibatches`` steps do, resumes exactly.
  """

  def __init__(self, make_rollout: Callable, *, rows_per_rollout: int, minibatches: int = 1,
               epochs: int = 1, seed: int = 0):
    if minibatches < 1 or epochs < 1:
      raise ValueError(f"minibatches and epochs must be >= 1, got {minibatches}, {epochs}")
    if rows_per_rollout % minibatches:
      raise ValueError(f"{rows_per_rollout} rows per rollout do not split into {minibatches} "
                       f"mini-batches")
    self.make_rollout = make_rollout
    self.rows = rows_per_rollout
    self.minibatches = minibatches
    self.epochs = epochs
    self.seed = seed
    self.steps_per_rollout = minibatches * epochs
    self.rollout_index = 0
    self.position = 0          # mini-batch within the current rollout
    self._rows = None          # the current rollout's rows
    self._order = None
    self._metrics: dict = {}

  def _permutation(self) -> np.ndarray:
    rng = np.random.default_rng([self.seed, self.rollout_index])
    return np.concatenate([rng.permutation(self.rows) for _ in range(self.epochs)])

  def next_batch(self, params, step: int) -> dict:
    del step
    if self._rows is None:
      t0 = time.perf_counter()
      self._rows, metrics = self.make_rollout(params, self.rollout_index)
      self._order = self._permutation()
      self._metrics = dict(metrics, **{"perf/rollout_seconds": time.perf_counter() - t0})
    size = self.rows // self.minibatches
    idx = self._order[self.position * size:(self.position + 1) * size]
    per_process = size // jax.process_count()
    mine = idx[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    batch = {k: v[mine] for k, v in self._rows.items()}
    self.position += 1
    if self.position == self.steps_per_rollout:
      self.rollout_index += 1
      self.position = 0
      self._rows = None
    return batch

  def pop_metrics(self) -> dict:
    """The current rollout's metrics, once (logged with the first step that used it)."""
    out, self._metrics = self._metrics, {}
    return out

  def get_state(self) -> dict:
    return {"rollout_index": self.rollout_index, "position": self.position}

  def set_state(self, state: dict) -> None:
    self.rollout_index = int(state["rollout_index"])
    self.position = int(state["position"])
    self._rows = None  # resampled on the next call (see the class docstring)
