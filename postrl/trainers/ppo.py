"""PPO with a learned value function (RLHF's PPO: Ouyang et al. 2022, after Schulman et al. 2017
and Ziegler et al. 2019), on verifiable or reward-model rewards.

Actor-critic. The policy is the language model; the critic is either a scalar head on the
policy's own final hidden states (``shared_trunk=True``: one forward gives both, the value loss
also trains the trunk) or a separate copy of the model with its own head (``shared_trunk=False``,
the InstructGPT set-up). Both live in one parameter tree (``ActorCritic``), trained by one
optimizer on

    loss = PPO-clip(ρ_t, A_t) + c_v value_loss(V_t, V_old_t, R_t)  (+ β KL_t if the KL is a loss)

Per rollout (``postrl.trainers.rollout``): sample completions, score them, then at every
completion token o_t (state s_t = the prefix before it)

    r_t   = -β (log π_old(o_t) - log π_ref(o_t))  + [t = last] * R(completion)   (KL in the reward)
    A_t, R_t = GAE(r, V_old; γ, λ)                 advantages whitened over the rollout's tokens

and ``epochs x minibatches`` clipped updates with value clipping (PPO2). V_t is read from the
hidden state that predicts o_t, so values, log-probs and the mask share one alignment.

PEFT (``config.peft``, ``postrl.peft``): the policy's adapters are trained together with the value
head, which is new and so trained in full (``split_trainable(..., modules_to_save=VALUE_HEAD)``);
a separate critic gets the same kind of adapters on its own frozen backbone, plus its head.
Rollouts, old log-probs / values and the loss use ``combine(trainable, frozen)``. The KL
reference is the policy's frozen base without adapters (``postrl.peft.base_view``: TRL's
"adapters disabled" reference; for LoRA / DoRA / QLoRA the initial policy), read out of the
policy's parameters at each rollout, so it never moves and is not a second copy. Checkpoints
hold the trainable part only; the export (``common.save_peft``) is the policy's adapters and
merged policy (the value head, as without PEFT, is not exported).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postrl import peft
from postrl import sharding as shd
from postrl.logprobs import logps_from_hidden, model_apply_fn
from postrl.losses import gae, kl_penalty, ppo_clip, value_loss
from postrl.metrics import plot_metrics
from postrl.models import ConfigError, Transformer, load_pretrained
from postrl.models.heads import ScalarHead, ScoredTransformer
from postrl.sampling.generate import stop_and_pad_ids, to_host
from postrl.trainers import common
from postrl.trainers.grpo import _config_holder, _training_problems
from postrl.trainers.loop import fit
from postrl.trainers.rollout import (RolloutSource, assemble_rows, encode_prompts,
                                     load_reward_model_reward, logps_fn, rows_per_rollout,
                                     sample, score_completions, trim_rows)
from postrl.trainers.step import learning_rate_schedule, make_optimizer


# the parameters PEFT trains in full next to the adapters: the new value head of either layout
VALUE_HEAD = r"^(value_head|critic\.head)\."


class ActorCritic(nnx.Module):
  """The policy and its value function in one module (one parameter tree, one optimizer)."""

  def __init__(self, policy: Transformer, *, critic: Transformer | None = None, rngs: nnx.Rngs):
    self.policy = policy
    self.shared_trunk = critic is None
    if critic is None:
      self.value_head = ScalarHead(policy.config.hidden_size,
                                   param_dtype=policy.config.param_dtype, rngs=rngs)
    else:
      self.critic = ScoredTransformer(critic, rngs=rngs)

  def logps_and_values(self, tokens_BxT, segment_ids_BxT, mask_BxT, *, chunk=None,
                       vocab_chunk=None):
    """(log π(tokens[t] | tokens[<t]), V(s_t)) [B, T], both read at position t - 1, masked."""
    h = self.policy.hidden_states(tokens_BxT, segment_ids_BxT=segment_ids_BxT)
    w, tied = self.policy.unembed_VxD_or_DxV()
    logps = logps_from_hidden(h[:, :-1], w.T if tied else w, tokens_BxT[:, 1:], chunk=chunk,
                              vocab_chunk=vocab_chunk)
    if self.shared_trunk:
      values = self.value_head(h[:, :-1])
    else:
      values = self.critic.token_scores(tokens_BxT, segment_ids_BxT)[:, :-1]
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0))) * mask_BxT.astype(jnp.float32)
    return pad(logps), pad(values)


@dataclasses.dataclass(frozen=True)
class PPOSettings:
  """PPO's resolved loss settings: clip range [1 - eps_low, 1 + eps_high], value-loss weight c_v
  and clip, KL coefficient β (in the reward or as a loss), GAE γ and λ, advantage whitening."""
  clip_eps_low: float
  clip_eps_high: float
  vf_coef: float
  vf_clip: float | None
  kl_coef: float
  kl_in_reward: bool
  gamma: float
  lam: float
  whiten_advantages: bool


def settings(loss_cfg) -> PPOSettings:
  """``config.loss`` -> ``PPOSettings``; ConfigError for γ or λ outside [0, 1], negative (or NaN)
  β, c_v or clip ranges."""
  s = PPOSettings(
      clip_eps_low=float(loss_cfg.clip_eps_low), clip_eps_high=float(loss_cfg.clip_eps_high),
      vf_coef=float(loss_cfg.vf_coef),
      vf_clip=None if loss_cfg.get("vf_clip") is None else float(loss_cfg.vf_clip),
      kl_coef=float(loss_cfg.kl_coef), kl_in_reward=bool(loss_cfg.kl_in_reward),
      gamma=float(loss_cfg.gamma), lam=float(loss_cfg.lam),
      whiten_advantages=bool(loss_cfg.whiten_advantages))
  if not (0 <= s.gamma <= 1 and 0 <= s.lam <= 1):
    raise ConfigError(f"config.loss: gamma and lam must be in [0, 1], got {s.gamma}, {s.lam}")
  if not (s.kl_coef >= 0 and s.vf_coef >= 0):  # NaN too
    raise ConfigError(f"config.loss: kl_coef and vf_coef must be >= 0, got {s.kl_coef}, "
                      f"{s.vf_coef}")
  if not (s.clip_eps_low >= 0 and s.clip_eps_high >= 0 and (s.vf_clip is None or s.vf_clip > 0)):
    raise ConfigError(f"config.loss: clip_eps_low and clip_eps_high must be >= 0 and vf_clip > 0 "
                      f"(or None), got {s.clip_eps_low}, {s.clip_eps_high}, {s.vf_clip}")
  return s


def token_rewards(rewards_B, old_logps_BxT, ref_logps_BxT, mask_BxT, *, kl_coef: float):
  """r_t = -β (log π_old - log π_ref) on completion tokens (when a reference is given) plus the
  sequence reward on each row's last completion token (Ziegler et al. 2019; Ouyang et al. 2022)."""
  mask = np.asarray(mask_BxT, np.float32)
  r = np.zeros_like(mask)
  if ref_logps_BxT is not None and kl_coef:
    r -= kl_coef * (np.asarray(old_logps_BxT) - np.asarray(ref_logps_BxT)) * mask
  T = mask.shape[1]
  last = T - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
  rows = np.arange(mask.shape[0])
  r[rows, last] += np.asarray(rewards_B, np.float32) * (mask.sum(1) > 0)
  return r


def whiten(x_BxT, mask_BxT, eps: float = 1e-8):
  """(x - mean) / std over the masked entries (PPO's advantage normalisation); 0 elsewhere."""
  m = np.asarray(mask_BxT, np.float32)
  n = max(m.sum(), 1.0)
  mean = (x_BxT * m).sum() / n
  std = np.sqrt((((x_BxT - mean) * m) ** 2).sum() / n)
  return (x_BxT - mean) / (std + eps) * m


def ppo_loss_fn(graphdef, s: PPOSettings, *, chunk=None, vocab_chunk=None):
  """``loss_fn(params, batch)``: PPO-clip + c_v value loss (+ β KL as a loss), token means.
  Batch: tokens, segment_ids, loss_mask, sampler_logps, old_logps, old_values, advantages,
  returns [B, T]; ref_logps [B, T] when the KL is a loss term."""

  def loss_fn(params, batch):
    mask = batch["loss_mask"]
    model = nnx.merge(graphdef, params)
    logps, values = model.logps_and_values(batch["tokens"], batch["segment_ids"], mask,
                                           chunk=chunk, vocab_chunk=vocab_chunk)
    pg, metrics = ppo_clip(logps, batch["old_logps"], batch["advantages"], mask,
                           clip_eps_low=s.clip_eps_low, clip_eps_high=s.clip_eps_high)
    vf, vf_metrics = value_loss(values, batch["old_values"], batch["returns"], mask,
                                clip_eps=s.vf_clip)
    loss = pg + s.vf_coef * vf
    metrics = dict(metrics, **vf_metrics)
    metrics["pg/loss"], metrics["vf/loss"] = pg, vf
    tokens = jnp.maximum(mask.sum(), 1.0)
    if "ref_logps" in batch:
      kl = (kl_penalty(logps, batch["ref_logps"], estimator="k3") * mask).sum() / tokens
      loss = loss + s.kl_coef * kl
      metrics["kl/ref"] = kl
    metrics["rollout/logp_mismatch"] = (
        jnp.abs(batch["old_logps"] - batch["sampler_logps"]) * mask).sum() / tokens
    return loss, dict(metrics, loss_weight=mask.sum())

  return loss_fn


class PPORollouts:
  """``make_rollout(params, index)``: samples, rewards, old log-probs and values, GAE.

  ``params`` are the actor-critic's full parameters. The KL reference is ``ref_host`` (the
  initial policy, placed once) or, with PEFT (``run.frozen`` set), the policy's base without
  adapters read out of ``params`` (module docstring)."""

  def __init__(self, config, run: common.Run, policy_graphdef, problems, s: PPOSettings):
    self.cfg, self.config, self.run, self.s = config.rollout, config, run, s
    self.problems = problems
    self.policy_graphdef = policy_graphdef
    self.weights = dict(config.rewards)
    self.options = {k: dict(v) for k, v in config.get("reward_options", {}).items()}
    self.reward_model = load_reward_model_reward(config.get("reward_model"))
    self.reward_model_weight = float((config.get("reward_model") or {}).get("weight", 1.0))
    self.prompt_ids = encode_prompts(run.tokenizer, [p.prompt for p in problems],
                                     system_prompt=config.get("system_prompt") or None)
    self.prompt_len = -(-max(len(p) for p in self.prompt_ids) // 16) * 16
    self.eos, self.pad = stop_and_pad_ids(_config_holder(run.model_cfg), run.tokenizer)
    chunk, vocab_chunk = config.get("logprob_chunk"), config.get("vocab_chunk")
    graphdef = run.graphdef

    @jax.jit
    def evaluate(params, tokens, segment_ids, mask):
      model = nnx.merge(graphdef, params)
      return model.logps_and_values(tokens, segment_ids, mask, chunk=chunk,
                                    vocab_chunk=vocab_chunk)

    self._evaluate = evaluate
    ref_graphdef, self.ref_from_policy = policy_graphdef, None
    if run.frozen is not None and s.kl_coef > 0:
      policy = nnx.state(nnx.merge(graphdef, peft.combine(run.params, run.frozen)).policy)
      ref_graphdef, self.ref_from_policy = peft.base_view(policy_graphdef, policy)
    self.ref_logps = logps_fn(model_apply_fn(ref_graphdef), mesh=run.mesh,
                              vocab_chunk=vocab_chunk, chunk=chunk)
    self.ref_host = None
    self.ref = None

  def _policy_params(self, params):
    return nnx.state(nnx.merge(self.run.graphdef, params).policy)

  def __call__(self, params, index: int):
    P, G = self.cfg.prompts, self.cfg.group_size
    t0 = time.perf_counter()
    n = len(self.problems)
    rng = np.random.default_rng([self.config.seed, index])
    idx = rng.choice(n, size=P, replace=n < P)
    ids = [self.prompt_ids[i] for i in idx for _ in range(G)]
    key = jax.random.fold_in(jax.random.key(self.config.seed), index)
    out = sample(self.policy_graphdef, self._policy_params(params), ids, key=key,
                 prompt_len=self.prompt_len, max_new_tokens=self.cfg.max_new_tokens,
                 temperature=self.cfg.temperature, top_p=self.cfg.get("top_p"),
                 eos_ids=self.eos, pad_id=self.pad, batch_size=self.cfg.get("batch_size") or None,
                 sampling_impl=self.cfg.get("sampling_impl") or "auto",
                 continuous=bool(self.cfg.get("continuous")))
    gen_seconds = time.perf_counter() - t0
    texts = [self.run.tokenizer.decode(out["completions"][b, :out["lengths"][b]])
             for b in range(len(ids))]
    probs = [self.problems[i] for i in idx for _ in range(G)]
    total, per_name = score_completions(
        texts, probs, out["lengths"], weights=self.weights, options=self.options,
        reward_model=self.reward_model, reward_model_weight=self.reward_model_weight)
    rows = assemble_rows(ids, out["completions"], out["lengths"], out["sampler_logps"],
                         prompt_len=self.prompt_len, pad_id=self.pad)
    if self.cfg.get("length_bucket"):
      rows = trim_rows(rows, prompt_len=self.prompt_len, bucket=self.cfg.length_bucket)
    put = lambda x: shd.put_global(x, shd.batch_sharding(self.run.mesh))
    old_logps, old_values = self._evaluate(params, put(rows["tokens"]), put(rows["segment_ids"]),
                                           put(rows["loss_mask"]))
    rows["old_logps"], rows["old_values"] = to_host(old_logps), to_host(old_values)
    ref = None
    if self.s.kl_coef > 0:
      if self.ref_from_policy is not None:  # PEFT: the base inside the policy's params
        ref_params = self.ref_from_policy(self._policy_params(params))
      else:
        if self.ref is None:
          policy = self._policy_params(params)
          self.ref = shd.put_global(self.ref_host, jax.tree.map(lambda x: x.sharding, policy))
        ref_params = self.ref
      ref = self.ref_logps(ref_params, rows)
      if not self.s.kl_in_reward:
        rows["ref_logps"] = ref
    rewards = np.array(total, np.float32)
    r = token_rewards(rewards, rows["old_logps"], ref if self.s.kl_in_reward else None,
                      rows["loss_mask"], kl_coef=self.s.kl_coef)
    adv, returns = gae(jnp.asarray(r), jnp.asarray(rows["old_values"]),
                       jnp.asarray(rows["loss_mask"]), gamma=self.s.gamma, lam=self.s.lam)
    adv = np.asarray(adv)
    rows["advantages"] = whiten(adv, rows["loss_mask"]) if self.s.whiten_advantages else adv
    rows["returns"] = np.asarray(returns)
    mask = rows["loss_mask"]
    metrics = {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()),
        "rollout/completion_tokens_mean": float(out["lengths"].mean()),
        "rollout/finished_fraction": float(out["finished"].mean()),
        "rollout/value_mean": float((rows["old_values"] * mask).sum() / max(mask.sum(), 1)),
        "rollout/return_mean": float((rows["returns"] * mask).sum() / max(mask.sum(), 1)),
        "perf/generate_seconds": gen_seconds,
    }
    if ref is not None:
      metrics["rollout/kl_ref"] = float(((rows["old_logps"] - ref) * mask).sum()
                                        / max(mask.sum(), 1))
    for name, values in per_name.items():
      metrics[f"rollout/reward/{name}"] = float(np.mean(values))
    return rows, metrics


def run(config, workdir: str | None) -> dict:
  """PPO training of ``config.model``; evaluates the policy before and after."""
  optim = common.optimizer_config(config)  # cheap checks first, the (slow) model load last
  s = settings(config.loss)
  r = config.rollout
  rows = rows_per_rollout(r)
  problems = _training_problems(config, common.eval_problems(config))
  run_ = common.start(config)
  common.check_rows(rows // r.minibatches, run_.mesh, config.accum_steps,
                    what="config.rollout: prompts x group_size / minibatches")
  use_peft = run_.frozen is not None
  policy = nnx.merge(run_.graphdef, peft.combine(run_.params, run_.frozen) if use_peft
                     else run_.params)
  critic = None
  if not config.shared_trunk:
    critic = load_pretrained(config.get("critic_model") or config.model,
                             **common.model_kwargs(config))
    if use_peft:  # the critic's backbone is adapted and frozen like the policy's
      peft.apply_peft(critic, config.peft)
  model = ActorCritic(policy, critic=critic, rngs=nnx.Rngs(config.seed))
  policy_graphdef = run_.graphdef
  ref_host = None if use_peft else run_.params
  frozen = None
  if use_peft:  # adapters + the new value head are trained; the bases are frozen
    graphdef, params, frozen = peft.split_trainable(model, modules_to_save=VALUE_HEAD)
    frozen = jax.tree.map(np.asarray, frozen)
  else:
    graphdef, params = nnx.split(model)
  params = jax.tree.map(np.asarray, params)
  del model, policy, critic
  run_.graphdef, run_.params, run_.frozen = graphdef, params, frozen
  make_rollout = PPORollouts(config, run_, policy_graphdef, problems, s)
  make_rollout.ref_host = ref_host if s.kl_coef > 0 else None
  source = RolloutSource(make_rollout, rows_per_rollout=rows, minibatches=r.minibatches,
                         epochs=r.epochs, seed=config.seed)
  policy_of = lambda p: nnx.merge(graphdef, p).policy
  result = fit(
      ppo_loss_fn(graphdef, s, chunk=config.get("logprob_chunk"),
                  vocab_chunk=config.get("vocab_chunk")),
      params, make_optimizer(optim), source, mesh=run_.mesh, total_steps=config.steps,
      workdir=workdir, seed=config.seed, accum_steps=config.accum_steps,
      save_every=config.checkpoint.every, keep_checkpoints=config.checkpoint.keep,
      fingerprint=common.fingerprint(config, run_.model_cfg, "accum_steps", "system_prompt",
                                     "shared_trunk", "critic_model",
                                     sections=("data", "optim", "rollout", "loss", "rewards",
                                               "reward_model", "peft")),
      log_every=config.log_every, lr_schedule=learning_rate_schedule(optim),
      flops_per_token=common.model_flops(run_.model_cfg, make_rollout.prompt_len
                                         + r.max_new_tokens) * (1 if config.shared_trunk else 2),
      eval_fn=(common.task_eval_fn(run_, config, to_model=policy_of)
               if run_.eval_problems else None),
      eval_every=config.eval.every, eval_before=config.eval.before, frozen=frozen)
  if workdir and jax.process_index() == 0:
    plot_metrics(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "reward.png"),
                 keys=("rollout/reward_mean", "vf/explained_variance", "loss"))
  rewards = [h["rollout/reward_mean"] for h in result.history if "rollout/reward_mean" in h]
  summary = dict(algorithm="ppo", num_train_problems=len(problems),
                 first_reward=rewards[0] if rewards else None,
                 last_reward=rewards[-1] if rewards else None)
  if use_peft:  # the policy's adapters (and merged policy); the value head is not exported
    policy_result = dataclasses.replace(result, state=dataclasses.replace(
        result.state, params=result.state.params["policy"]))
    return common.finish(dataclasses.replace(run_, graphdef=policy_graphdef,
                                             frozen=frozen["policy"]),
                         config, workdir, policy_result, **summary)
  return common.finish(run_, config, workdir, result,
                       export=lambda p: nnx.split(policy_of(p)), **summary)
