"""The GRPO family: critic-free RL with verifiable rewards (GRPO, Dr. GRPO, DAPO, GSPO, RLOO).

Each rollout samples G completions of each of P prompts with the current policy, scores them with
the config's weighted rewards (``postrl.rewards.combine_rewards``), and turns each group's rewards
into advantages; then ``epochs x minibatches`` optimizer steps minimise the variant's clipped
surrogate (``postrl.losses.grpo``) against the rollout's old log-probs:

    A_i  = (r_i - mean_g r) / (std_g r + eps)           grpo, dapo, gspo (group_advantages)
         = r_i - mean_g r                                dr_grpo (no std scaling)
         = r_i - mean_{j != i} r_j                       rloo (leave-one-out baseline)
    l_t  = -min(ρ_t A_i, clip(ρ_t, 1 - ε_low, 1 + ε_high) A_i) + β KL_t(π_θ ‖ π_ref),
    ρ_t  = π_θ(o_t) / π_old(o_t)  (gspo: the length-normalised sequence ratio)

aggregated as each paper does (``GRPO_AGGREGATION``). ``ALGORITHMS`` holds each method's
defaults; the config's ``loss`` fields override them. DAPO's two data-side pieces live here:
dynamic sampling (groups whose rewards are all equal carry no gradient; they are dropped and more
prompts sampled, up to ``max_sampling_rounds``) and overlong reward shaping (the ``overlong``
reward: a linear penalty over the last ``overlong_cache`` tokens of the budget).

With a single update per rollout (epochs = minibatches = 1) old = current params, so the old
log-probs are not recomputed (ρ = 1 with the gradient of log π). Otherwise they are computed once
per rollout. Either way the log-probs the sampler reported are compared with the trainer's and
logged as ``rollout/logp_mismatch`` (mean |Δ| per token; ~1e-6 in float32 on CPU).

PEFT (``config.peft``, ``postrl.peft``): only the adapters are trained; rollouts are sampled from,
and old log-probs and the loss computed with, the adapted policy ``combine(adapters, frozen)``.
The KL reference π_ref is the frozen base without adapters (``postrl.peft.base_view``, TRL's
"adapters disabled" reference): for LoRA / DoRA / QLoRA the policy at initialisation, for prompt /
prefix tuning the model without its virtual tokens. It is read out of the policy's parameters at
each rollout (the frozen arrays ``fit`` holds on the devices), so it never moves and no second
copy of the model is kept.

Sources: Shao et al. 2024 (DeepSeekMath, GRPO); Liu et al. 2025 (Dr. GRPO); Yu et al. 2025 (DAPO);
Zheng et al. 2025 (GSPO); Ahmadian et al. 2024 (RLOO).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from postrl import peft
from postrl import sharding as shd
from postrl.data.records import read_jsonl
from postrl.logprobs import model_apply_fn, token_logps
from postrl.losses import grpo, group_advantages, rloo_advantages
from postrl.losses._policy import GRPO_AGGREGATION
from postrl.metrics import plot_metrics
from postrl.models import ConfigError
from postrl.sampling.generate import stop_and_pad_ids
from postrl.trainers import common
from postrl.trainers.loop import fit
from postrl.trainers.rollout import (RolloutSource, assemble_rows, encode_prompts,
                                     load_reward_model_reward, logps_fn, rows_per_rollout,
                                     sample, score_completions, trim_rows)
from postrl.trainers.step import learning_rate_schedule, make_optimizer

# Each method's loss variant, advantage estimator and the hyper-parameters its paper uses.
ALGORITHMS = {
    "grpo": dict(variant="grpo", advantages="group", clip_eps_low=0.2, clip_eps_high=0.2,
                 dynamic_sampling=False, overlong=False),
    "dr_grpo": dict(variant="dr_grpo", advantages="none", clip_eps_low=0.2, clip_eps_high=0.2,
                    dynamic_sampling=False, overlong=False),
    "dapo": dict(variant="dapo", advantages="group", clip_eps_low=0.2, clip_eps_high=0.28,
                 dynamic_sampling=True, overlong=True),
    "gspo": dict(variant="gspo", advantages="group", clip_eps_low=3e-4, clip_eps_high=4e-4,
                 dynamic_sampling=False, overlong=False),
    "rloo": dict(variant="grpo", advantages="rloo", clip_eps_low=0.2, clip_eps_high=0.2,
                 dynamic_sampling=False, overlong=False),
}


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
  """The resolved loss settings of a run (the algorithm's defaults with the config's overrides)."""
  algorithm: str
  variant: str
  advantages: str
  clip_eps_low: float
  clip_eps_high: float
  kl_coef: float
  kl_estimator: str
  dynamic_sampling: bool
  overlong: bool
  overlong_cache: int
  max_sampling_rounds: int
  norm_len: float | None
  tis_cap: float | None


def settings(loss_cfg, *, max_new_tokens: int) -> GRPOSettings:
  """Resolves ``config.loss``: None fields take the algorithm's defaults (``ALGORITHMS``)."""
  name = loss_cfg.algorithm
  if name not in ALGORITHMS:
    raise ConfigError(f"config.loss.algorithm: unknown {name!r}; known: {sorted(ALGORITHMS)}")
  preset = ALGORITHMS[name]
  pick = lambda key: preset[key] if loss_cfg.get(key) is None else loss_cfg[key]
  out = GRPOSettings(
      algorithm=name, variant=preset["variant"], advantages=preset["advantages"],
      clip_eps_low=float(pick("clip_eps_low")), clip_eps_high=float(pick("clip_eps_high")),
      kl_coef=float(loss_cfg.kl_coef), kl_estimator=loss_cfg.kl_estimator,
      dynamic_sampling=bool(pick("dynamic_sampling")), overlong=bool(pick("overlong")),
      overlong_cache=int(loss_cfg.get("overlong_cache") or max(1, max_new_tokens // 4)),
      max_sampling_rounds=int(loss_cfg.get("max_sampling_rounds") or 1),
      # Dr. GRPO divides by a constant: the generation budget
      norm_len=float(max_new_tokens) if preset["variant"] == "dr_grpo" else None,
      tis_cap=loss_cfg.get("tis_cap"))
  if not (out.kl_coef >= 0 and out.clip_eps_low >= 0 and out.clip_eps_high >= 0):  # NaN too
    raise ConfigError(f"config.loss: kl_coef and clip ranges must be >= 0, got {out}")
  if out.max_sampling_rounds < 1 or not (out.tis_cap is None or out.tis_cap > 0):
    raise ConfigError(f"config.loss: max_sampling_rounds must be >= 1 and tis_cap > 0 (or "
                      f"None), got {out.max_sampling_rounds}, {out.tis_cap}")
  if out.overlong_cache >= max_new_tokens:
    raise ConfigError(f"config.loss.overlong_cache={out.overlong_cache} must be below "
                      f"rollout.max_new_tokens={max_new_tokens}")
  return out


def advantages(rewards_B, *, group_size: int, estimator: str) -> np.ndarray:
  """Sequence advantages of consecutive groups: "group" (GRPO), "none" (Dr. GRPO), "rloo"."""
  r = jnp.asarray(rewards_B, jnp.float32)
  if estimator == "rloo":
    return np.asarray(rloo_advantages(r, group_size=group_size))
  return np.asarray(group_advantages(r, group_size=group_size, scale=estimator))


def grpo_loss_fn(apply_fn, s: GRPOSettings, *, chunk: int | None = None,
                 vocab_chunk: int | None = None):
  """``loss_fn(params, batch)`` for ``fit``. Batch (``postrl.trainers.rollout`` rows): tokens,
  segment_ids, loss_mask, sampler_logps [B, T], advantages [B]; old_logps [B, T] when there are
  several updates per rollout; ref_logps [B, T] when kl_coef > 0. ``loss_weight`` is the number
  of completions (sequence-mean aggregations) or of completion tokens (token_mean)."""
  agg = GRPO_AGGREGATION[s.variant]

  def loss_fn(params, batch):
    mask = batch["loss_mask"]
    logps = token_logps(apply_fn, params, batch["tokens"], mask, chunk=chunk,
                        vocab_chunk=vocab_chunk, segment_ids_BxT=batch["segment_ids"])
    old = batch.get("old_logps")
    loss, metrics = grpo(
        logps, old, batch.get("ref_logps"), batch["advantages"], mask, variant=s.variant,
        clip_eps_low=s.clip_eps_low, clip_eps_high=s.clip_eps_high, kl_coef=s.kl_coef,
        kl_estimator=s.kl_estimator, norm_len=s.norm_len,
        rollout_logps_BxT=batch["sampler_logps"] if s.tis_cap is not None else None,
        tis_cap=s.tis_cap)
    # the trainer's log-probs of the policy that sampled (old, or the current params at the first
    # update) against the sampler's own: they must agree up to numerics
    trainer = jax.lax.stop_gradient(logps) if old is None else old
    tokens = jnp.maximum(mask.sum(), 1.0)
    metrics = dict(metrics)
    mismatch = jnp.abs(trainer - batch["sampler_logps"]) * mask
    metrics["rollout/logp_mismatch"] = mismatch.sum() / tokens
    weight = mask.sum() if agg == "token_mean" else jnp.asarray(mask.shape[0], jnp.float32)
    return loss, dict(metrics, loss_weight=weight)

  return loss_fn


def _check_answers(problems, config):
  """A blank ``answer`` is refused at load when a configured reward compares against it (a
  ``reference`` parameter, e.g. ``math``): found at rollout it ended the run mid-training without
  naming the file. Reward-model-only runs may leave answers blank."""
  from postrl.rewards.compose import REWARDS, _parameters  # pylint: disable=import-outside-toplevel
  users = sorted(name for name in dict(config.get("rewards") or {}) if name in REWARDS and any(
      p.name == "reference" for p in _parameters(REWARDS[name])))
  if not users:
    return
  for i, problem in enumerate(problems):
    if not str(problem.answer).strip():
      raise ConfigError(f"config.data.path: {config.data.path}: problem {i} (prompt "
                        f"{problem.prompt[:60]!r}) has a blank 'answer', which reward(s) {users} "
                        f"compare completions against")


def _training_problems(config, eval_problems):
  if config.data.get("path"):
    problems, skipped = read_jsonl(config.data.path, "rl",
                                   skip_malformed=config.data.get("skip_malformed", False))
    if skipped:
      print(f"skipped {skipped} malformed records in {config.data.path}")
    if not problems:
      raise ConfigError(f"config.data.path: {config.data.path} holds no problems")
    _check_answers(problems, config)
    return problems
  return common.held_out_train_problems(config.data.task, config.data.num_train,
                                        config.data.train_seed, eval_problems)


class GRPORollouts:
  """``make_rollout(params, index)`` for ``RolloutSource``: prompts, samples, rewards,
  advantages, rows, and (when needed) old and reference log-probs.

  ``params`` are the policy's full parameters (with PEFT: ``combine(adapters, frozen)``). The
  reference (``ref_host``, when kl_coef > 0) is ``ref_params_host`` (host params, placed once),
  or with PEFT (``run.frozen`` set) a function reading the base without adapters out of
  ``params`` (module docstring)."""

  def __init__(self, config, run: common.Run, problems, s: GRPOSettings, *, ref_params_host):
    self.cfg = config.rollout
    self.config = config
    self.run = run
    self.problems = problems
    self.s = s
    self.weights = dict(config.rewards)
    self.options = {k: dict(v) for k, v in config.get("reward_options", {}).items()}
    if s.overlong:
      self.weights.setdefault("overlong", 1.0)
      self.options["overlong"] = dict(max_tokens=self.cfg.max_new_tokens,
                                      cache_tokens=s.overlong_cache)
    self.reward_model = load_reward_model_reward(config.get("reward_model"))
    self.reward_model_weight = float((config.get("reward_model") or {}).get("weight", 1.0))
    self.system_prompt = config.get("system_prompt") or None
    self.prompt_ids = encode_prompts(run.tokenizer, [p.prompt for p in problems],
                                     system_prompt=self.system_prompt)
    longest = max(len(p) for p in self.prompt_ids)
    self.prompt_len = -(-longest // 16) * 16
    self.eos, self.pad = stop_and_pad_ids(_config_holder(run.model_cfg), run.tokenizer)
    apply_fn = model_apply_fn(run.graphdef)
    self.logps = logps_fn(apply_fn, mesh=run.mesh, vocab_chunk=config.get("vocab_chunk"),
                          chunk=config.get("logprob_chunk"),
                          rows_per_call=self.cfg.get("logprob_rows") or None)
    self.need_old = self.cfg.epochs * self.cfg.minibatches > 1
    self.ref_host = ref_params_host if s.kl_coef > 0 else None
    self.ref = None
    self.ref_logps = self.logps
    if s.kl_coef > 0 and run.frozen is not None:  # PEFT: params -> the base inside them
      ref_graphdef, self.ref_host = peft.base_view(run.graphdef,
                                                   peft.combine(run.params, run.frozen))
      self.ref_logps = logps_fn(model_apply_fn(ref_graphdef), mesh=run.mesh,
                                vocab_chunk=config.get("vocab_chunk"),
                                chunk=config.get("logprob_chunk"),
                                rows_per_call=self.cfg.get("logprob_rows") or None)
    self.order_rng_seed = config.seed

  def _prompt_indices(self, index: int, round_: int, count: int) -> np.ndarray:
    """Prompts of rollout ``index``: consecutive slices of seeded epoch-wise permutations."""
    n = len(self.problems)
    start = (index * self.s.max_sampling_rounds + round_) * count
    out = []
    for k in range(start, start + count):
      epoch, pos = divmod(k, n)
      perm = np.random.default_rng([self.order_rng_seed, epoch]).permutation(n)
      out.append(perm[pos])
    return np.array(out)

  def _sample_groups(self, params, index: int, round_: int, count: int):
    """``count`` prompts x G completions, scored: (prompt indices, samples, totals, per-name)."""
    G = self.cfg.group_size
    idx = self._prompt_indices(index, round_, count)
    ids = [self.prompt_ids[i] for i in idx for _ in range(G)]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), index), round_)
    out = sample(self.run.graphdef, params, ids, key=key, prompt_len=self.prompt_len,
                 max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                 top_p=self.cfg.get("top_p"), eos_ids=self.eos, pad_id=self.pad,
                 batch_size=self.cfg.get("batch_size") or None,
                 sampling_impl=self.cfg.get("sampling_impl") or "auto",
                 continuous=bool(self.cfg.get("continuous")))
    texts = [self.run.tokenizer.decode(out["completions"][b, :out["lengths"][b]])
             for b in range(len(ids))]
    probs = [self.problems[i] for i in idx for _ in range(G)]
    total, per_name = score_completions(
        texts, probs, out["lengths"], weights=self.weights, options=self.options,
        reward_model=self.reward_model, reward_model_weight=self.reward_model_weight)
    return idx, ids, out, total, per_name

  def __call__(self, params, index: int):
    P, G = self.cfg.prompts, self.cfg.group_size
    t0 = time.perf_counter()
    kept, rounds, seen_groups, spread_groups = [], 0, 0, 0
    all_totals, all_names, all_lengths, all_finished = [], [], [], []
    while True:
      idx, ids, out, total, per_name = self._sample_groups(params, index, rounds, P)
      rounds += 1
      spread = total.reshape(-1, G).std(-1) > 0
      seen_groups += len(spread)
      spread_groups += int(spread.sum())
      all_totals.append(total)
      all_names.append(per_name)
      all_lengths.append(out["lengths"])
      all_finished.append(out["finished"])
      for g in range(len(idx)):
        if self.s.dynamic_sampling and not spread[g]:
          continue
        rows = slice(g * G, (g + 1) * G)
        kept.append((ids[rows], {k: v[rows] for k, v in out.items()}, total[rows]))
      if (not self.s.dynamic_sampling or len(kept) >= P
          or rounds >= self.s.max_sampling_rounds):
        break
    filled = len(kept)
    if len(kept) < P:  # dynamic sampling ran out of rounds: top up with all-equal groups
      # (advantage 0: they add no policy gradient, only keep the batch shape)
      for g in range(len(idx)):
        if len(kept) >= P:
          break
        if not spread[g]:
          rows = slice(g * G, (g + 1) * G)
          kept.append((ids[rows], {k: v[rows] for k, v in out.items()}, total[rows]))
    kept = kept[:P]
    gen_seconds = time.perf_counter() - t0
    ids = [i for k in kept for i in k[0]]
    cat = lambda key: np.concatenate([k[1][key] for k in kept])
    rewards = np.concatenate([k[2] for k in kept])
    rows = assemble_rows(ids, cat("completions"), cat("lengths"), cat("sampler_logps"),
                         prompt_len=self.prompt_len, pad_id=self.pad)
    if self.cfg.get("length_bucket"):
      rows = trim_rows(rows, prompt_len=self.prompt_len, bucket=self.cfg.length_bucket)
    rows["advantages"] = advantages(rewards, group_size=G, estimator=self.s.advantages)
    if self.need_old:
      rows["old_logps"] = self.logps(params, rows)
    if callable(self.ref_host):  # PEFT: the base inside the policy's params, no copy
      rows["ref_logps"] = self.ref_logps(self.ref_host(params), rows)
    elif self.ref_host is not None:
      if self.ref is None:  # the frozen reference, placed like the policy's params
        self.ref = shd.put_global(self.ref_host, jax.tree.map(lambda x: x.sharding, params))
      rows["ref_logps"] = self.logps(self.ref, rows)
    totals = np.concatenate(all_totals)
    lengths, finished = np.concatenate(all_lengths), np.concatenate(all_finished)
    metrics = {
        "rollout/reward_mean": float(totals.mean()),
        "rollout/reward_std": float(totals.std()),
        "rollout/completion_tokens_mean": float(lengths.mean()),
        "rollout/finished_fraction": float(finished.mean()),
        "rollout/groups_with_spread": spread_groups / max(seen_groups, 1),
        "rollout/sampling_rounds": float(rounds),
        "rollout/kept_groups_with_spread": min(filled, P) / P,
        "rollout/advantage_abs_mean": float(np.abs(rows["advantages"]).mean()),
        "perf/generate_seconds": gen_seconds,
        "perf/generated_tokens_per_second": float(lengths.sum()) / max(gen_seconds, 1e-9),
    }
    for name in all_names[0]:
      metrics[f"rollout/reward/{name}"] = float(np.concatenate([n[name] for n in all_names]).mean())
    return rows, metrics


class _config_holder:  # pylint: disable=invalid-name
  """The ``model.config`` attribute ``stop_and_pad_ids`` reads, without building a model."""

  def __init__(self, cfg):
    self.config = cfg


def run(config, workdir: str | None) -> dict:
  """GRPO-family training of ``config.model`` on ``config.data``; evaluates before and after."""
  optim = common.optimizer_config(config)  # cheap checks first, the (slow) model load last
  r = config.rollout
  s = settings(config.loss, max_new_tokens=r.max_new_tokens)
  if r.group_size < 2:
    raise ConfigError(f"config.rollout.group_size must be >= 2 (group advantages), got "
                      f"{r.group_size}")
  rows = rows_per_rollout(r)
  problems = _training_problems(config, common.eval_problems(config))
  run_ = common.start(config)
  common.check_rows(rows // r.minibatches, run_.mesh, config.accum_steps,
                    what="config.rollout: prompts x group_size / minibatches")
  make_rollout = GRPORollouts(config, run_, problems, s,
                              ref_params_host=run_.params if run_.frozen is None else None)
  source = RolloutSource(make_rollout, rows_per_rollout=rows, minibatches=r.minibatches,
                         epochs=r.epochs, seed=config.seed)
  seq_len = make_rollout.prompt_len + r.max_new_tokens
  result = fit(
      grpo_loss_fn(model_apply_fn(run_.graphdef), s, chunk=config.get("logprob_chunk"),
                   vocab_chunk=config.get("vocab_chunk")),
      run_.params, make_optimizer(optim), source, mesh=run_.mesh, total_steps=config.steps,
      workdir=workdir, seed=config.seed, accum_steps=config.accum_steps,
      save_every=config.checkpoint.every, keep_checkpoints=config.checkpoint.keep,
      fingerprint=common.fingerprint(config, run_.model_cfg, "accum_steps", "system_prompt",
                                     sections=("data", "optim", "rollout", "loss", "rewards",
                                               "reward_model", "peft")),
      log_every=config.log_every, lr_schedule=learning_rate_schedule(optim),
      flops_per_token=common.model_flops(run_.model_cfg, seq_len),
      eval_fn=common.task_eval_fn(run_, config) if run_.eval_problems else None,
      eval_every=config.eval.every, eval_before=config.eval.before, frozen=run_.frozen)
  if workdir and jax.process_index() == 0:
    plot_metrics(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "reward.png"),
                 keys=("rollout/reward_mean", "rollout/completion_tokens_mean",
                       "rollout/groups_with_spread"))
    print(f"wrote {os.path.join(workdir, 'reward.png')}")
  rewards = [h["rollout/reward_mean"] for h in result.history if "rollout/reward_mean" in h]
  return common.finish(run_, config, workdir, result, algorithm=s.algorithm,
                       num_train_problems=len(problems),
                       first_reward=rewards[0] if rewards else None,
                       last_reward=rewards[-1] if rewards else None,
                       rows_per_step=rows // r.minibatches,
                       steps_per_rollout=r.epochs * r.minibatches,
                       rollouts=math.ceil(config.steps / (r.epochs * r.minibatches)))
