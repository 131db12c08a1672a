"""Reward-model training: a scalar head on the policy's decoder (``ScoredTransformer``), trained
on pairs (Bradley-Terry), rankings (Plackett-Luce) or step labels (process reward).

The model starts as the pretrained decoder plus a fresh head s = w · h + b (w ~ N(0, 1/(D+1)),
b = 0). A reply's score r(x, y) is read at its last token (the end-of-turn token); a step's score
at the last token of that step. ``config.loss.name`` picks the loss (``postrl.losses``):

  bradley_terry   -log σ(r(x, y_w) - r(x, y_l) - m)               pairs (Ouyang et al. 2022;
                  the optional margin m as in Touvron et al. 2023)
                  1/C(K,2) Σ_{i<j} -log σ(r_i - r_j)               rankings: all pairs of a
                  ranking are one batch element (InstructGPT, Ouyang et al. 2022)
  plackett_luce   -Σ_k [r_k - log Σ_{j>=k} exp r_j]                rankings, best first
                  (Plackett 1975; Luce 1959); with K = 2 it is Bradley-Terry
  process_reward  BCE(σ(z_s), y_s) over the steps of a solution    step labels (Lightman et al.
                  2023, hard labels; Wang et al. 2024, Math-Shepherd, soft labels)

Data (``config.data``): pairs or rankings from a JSONL file or made by the policy itself on a
built-in task (sampled and scored by the task's verifier, ``postrl.data.preference``; rankings of
K > 2 need ``reward="graded"``), with held-out records from held-out problems. Step labels
(``data.kind="steps"``) come from a JSONL file of ``{"prompt", "steps", "labels"}`` records
(``data.path``, ``data.eval_path``) or, without ``data.path``, from the policy's own solutions
labelled by Monte-Carlo roll-outs (Math-Shepherd, Wang et al. 2024; ``verifier_step_data``):
``data.num_samples`` solutions per problem (``postrl.data.verifier.sample_and_score``), split into
steps at newlines, and each step prefix s_1..s_j completed ``data.step_rollouts`` times and
scored by the verifier, r_i in [0, 1]: y_j = max_i r_i (hard estimation) or, with
``data.step_soft``, mean_i r_i (soft estimation); the last step gets the solution's own outcome
(``postrl.data.verifier.monte_carlo_step_labels``). Held-out step records come from
``data.eval_path`` or, without it, from the held-out problems the same way. Self-made data is
cached in ``workdir/data/{train,eval}_{kind}.jsonl`` (``steps`` included) with a ``.meta.json``
of the settings it was made with: a rerun with the same settings (a resume) reads it back, one
with other settings is an error.

Evaluation, before and after training, on the held-out records: ``pair_accuracy`` (the fraction
of ordered response pairs scored in the right order: the pairwise accuracy of a BT model), for
rankings also ``top1_accuracy`` (the best response scores highest) and ``order_accuracy`` (the
whole ranking is reproduced), and for step labels ``step_accuracy`` (σ(z) > 0.5 agrees with
y > 0.5) and ``step_loss``; the held-out scores of pairs and rankings are kept in
``workdir/eval/scores_step{step}.npz``. Held-out rankings from ``data.eval_path`` keep their own
length (padded to the longest of them, ``eval_k`` in the summary), whatever ``data.k`` the model
trains with, so models trained on rankings of different K are compared on the same held-out set.

With ``config.save_model`` the model is written to ``workdir/model`` as an HF folder: backbone
tensors under transformers' names and the head as ``score.weight`` / ``score.bias``, loadable by
``postrl.rewards.reward_model.RewardModelScorer`` and by transformers'
``AutoModelForSequenceClassification`` (details there).

PEFT (``config.peft``, ``postrl.peft``): the backbone gets the adapters and stays frozen; the scalar
head is new, so it is trained in full next to them (``split_trainable(...,
modules_to_save=HEAD)``, HF PEFT's ``modules_to_save``). Checkpoints hold adapters + head. The
outputs are the backbone's adapters (``workdir/adapter.safetensors``, ``common.save_peft``), the
head (``workdir/head.safetensors``: ``score.weight`` [1, D], ``score.bias`` [1]) and, with
``config.save_model``, the merged backbone with the head as the HF folder above (LoRA / DoRA /
QLoRA; prompt / prefix tuning has no merged form). Self-made preference data is sampled from the
frozen base (``postrl.trainers.dpo.reference_model``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postrl import peft
from postrl.data.preference import (KINDS, OVERFLOW_MODES, REWARD_KINDS, listwise_accuracy,
                                    pairwise_accuracy, read_step_jsonl, record_batches,
                                    tokenize_preferences, tokenize_steps)
from postrl.data.records import DataError, write_jsonl
from postrl.data.verifier import monte_carlo_step_labels, reward_stats, sample_and_score
from postrl.losses import bradley_terry, bradley_terry_rankings, plackett_luce, process_reward
from postrl.models import ConfigError, ScoredTransformer
from postrl.trainers import common
from postrl.trainers.dpo import (apply_over_dataset, before_after, preference_records,
                                 read_preference_files, response_masks, seconds_per_step,
                                 tokenized, verifier_data_source)
from postrl.trainers.loop import fit
from postrl.trainers.step import learning_rate_schedule, make_optimizer

LOSS_NAMES = ("bradley_terry", "plackett_luce", "process_reward")
HEAD = r"^head\."  # trained in full next to the PEFT adapters (the head is new)
HEAD_FILE = "head.safetensors"  # the head beside the adapters of a PEFT run
_KINDS = {"bradley_terry": ("pairs", "rankings"), "plackett_luce": ("rankings", "pairs"),
          "process_reward": ("steps",)}


def sequence_scores(graphdef, params, batch):
  """r(x, y_k) [b, K] of a batch of ``tokens`` / ``segment_ids`` [b, K, T]."""
  tokens = batch["tokens"]
  b, K, T = tokens.shape
  model = nnx.merge(graphdef, params)
  return model(tokens.reshape(b * K, T), batch["segment_ids"].reshape(b * K, T)).reshape(b, K)


def step_logits(graphdef, params, batch):
  """z_s [b, S]: the per-token scores at each step's last token (``batch["step_pos"]``)."""
  model = nnx.merge(graphdef, params)
  scores_BxT = model.token_scores(batch["tokens"], batch["segment_ids"])
  return jnp.take_along_axis(scores_BxT, batch["step_pos"], axis=1)


def reward_loss(name: str, scores_BxK, mask_BxK, *, margin: float = 0.0, kind: str = "pairs"):
  """Sequence-score losses: Bradley-Terry of a pair (columns 0 and 1, ``kind="pairs"``) or of
  every ordered pair of a ranking (``kind="rankings"``, ``bradley_terry_rankings``: a mean per
  ranking), or Plackett-Luce (either kind)."""
  if name == "bradley_terry" and kind == "rankings":
    if margin:
      raise ValueError("a Bradley-Terry margin applies to pairs only")
    return bradley_terry_rankings(scores_BxK, mask_BxK=mask_BxK)
  if name == "bradley_terry":
    m = None if not margin else jnp.full(scores_BxK.shape[:1], margin, jnp.float32)
    return bradley_terry(scores_BxK[:, 0], scores_BxK[:, 1], margin_B=m)
  if name == "plackett_luce":
    return plackett_luce(scores_BxK, mask_BxK=mask_BxK)
  raise ValueError(f"unknown sequence reward loss {name!r}")


def reward_loss_fn(graphdef, loss_cfg, kind: str = "pairs"):
  """``loss_fn(params, batch)`` for ``fit`` on batches of data ``kind``. The losses report their
  own ``loss_weight`` (pairs, ranked records, labelled steps), so gradient accumulation is
  exact."""
  if loss_cfg.name == "process_reward":
    def loss_fn(params, batch):
      return process_reward(step_logits(graphdef, params, batch), batch["step_labels"],
                            batch["step_mask"])
  else:
    def loss_fn(params, batch):
      return reward_loss(loss_cfg.name, sequence_scores(graphdef, params, batch),
                         batch["response_mask"], margin=loss_cfg.get("margin", 0.0), kind=kind)
  return loss_fn


def check_config(config) -> None:
  """``ConfigError`` naming the key for a bad loss / data setting (before anything slow)."""
  name, data = config.loss.name, config.data
  if name not in LOSS_NAMES:
    raise ConfigError(f"config.loss.name: unknown loss {name!r}; expected one of {LOSS_NAMES}")
  if data.kind not in KINDS + ("steps",):
    raise ConfigError(f"config.data.kind: expected one of {KINDS + ('steps',)}, got {data.kind!r}")
  if data.kind not in _KINDS[name]:
    raise ConfigError(f"config.data.kind={data.kind!r} does not suit config.loss.name={name!r} "
                      f"(it needs kind {' or '.join(_KINDS[name])})")
  if name == "bradley_terry" and data.kind == "rankings" and config.loss.get("margin", 0.0):
    raise ConfigError("config.loss.margin: the Bradley-Terry margin applies to pairs only; set it "
                      "to 0 for rankings (kind='rankings' uses every pair of a ranking)")
  if data.kind == "steps" and not data.path and data.get("step_rollouts", 4) < 1:
    raise ConfigError(f"config.data.step_rollouts: roll-outs per step prefix must be >= 1, got "
                      f"{data.step_rollouts}")
  if data.overflow not in OVERFLOW_MODES:
    raise ConfigError(f"config.data.overflow: expected one of {OVERFLOW_MODES}, got "
                      f"{data.overflow!r}")
  if data.reward not in REWARD_KINDS:
    raise ConfigError(f"config.data.reward: expected one of {REWARD_KINDS}, got {data.reward!r}")


# ----------------------------------------------------------------------------------- eval


def sequence_eval(score_fn, data, *, batch_size: int, mesh, scores_dir: str | None = None):
  """``extra(params, step)``: held-out pair accuracy (and top-1 / full-order accuracy for
  rankings) of the model's scores on ``data``. With ``scores_dir`` the scores are also written
  there (``scores_step{step}.npz``: ``scores`` float32 [N, K], ``mask`` [N, K], process 0), for
  per-record analysis such as a bootstrap over the held-out records."""
  mask = response_masks(data)

  def extra(params, step):
    scores = apply_over_dataset(score_fn, params, data, batch_size=batch_size,
                                mesh=mesh)["scores"]
    if scores_dir and jax.process_index() == 0:
      os.makedirs(scores_dir, exist_ok=True)
      np.savez(os.path.join(scores_dir, f"scores_step{step}.npz"),
               scores=np.asarray(scores, np.float32), mask=mask)
    out = {"pair_accuracy": pairwise_accuracy(scores, mask)}
    if data.kind == "rankings":
      listwise = listwise_accuracy(scores, mask)
      out.update(top1_accuracy=listwise["top1"], order_accuracy=listwise["full_order"])
    return out

  return extra


def step_eval(logit_fn, data, *, batch_size: int, mesh):
  """``extra(params, step)``: held-out step accuracy and BCE of a process reward model."""
  rows = [data.row(i) for i in range(len(data))]
  labels = np.stack([r["step_labels"] for r in rows])
  mask = np.stack([r["step_mask"] for r in rows]) > 0

  def extra(params, step):
    del step
    z = apply_over_dataset(logit_fn, params, data, batch_size=batch_size,
                           mesh=mesh)["logits"].astype(np.float64)
    bce = np.logaddexp(0.0, -z) * labels + np.logaddexp(0.0, z) * (1.0 - labels)
    return {"step_accuracy": float(((z > 0) == (labels > 0.5))[mask].mean()),
            "step_loss": float(bce[mask].mean())}

  return extra


# -------------------------------------------------------------------------------------- data


def held_out_data(records, run, config):
  """Held-out pairs or rankings, tokenised. Rankings keep their own length: K is the longest
  held-out ranking, not ``data.k``, so a file of rankings of any K evaluates a model trained on
  any K (shorter rankings are padded with masked responses)."""
  if config.data.kind != "rankings":
    return tokenized(records, run, config, "eval")
  data = tokenize_preferences(records, run.tokenizer, seq_len=config.seq_len,
                              system_prompt=config.get("system_prompt") or None,
                              overflow=config.data.overflow, source="eval")
  if data.num_truncated and jax.process_index() == 0:
    print(f"eval: {data.num_truncated} responses truncated to fit seq_len={config.seq_len}")
  return data


def verifier_step_data(model, tokenizer, problems, reward_fn, *, rollouts: int = 4,
                       soft: bool = False, num_samples: int = 8, max_new_tokens: int = 48,
                       temperature: float = 1.0, max_steps: int | None = None, seed: int = 0,
                       batch_size: int = 64, system_prompt: str | None = None,
                       cache_path: str | None = None, settings=None) -> tuple[list, dict]:
  """Step-labelled records made by the model itself (Math-Shepherd, Wang et al. 2024).

  ``num_samples`` solutions of every problem (``sample_and_score``, key ``seed``) are split into
  steps at newlines; step j of a solution is labelled by completing s_1..s_j ``rollouts`` times
  (key ``fold_in(seed, 1)``) and scoring each completion, r_i = clip(reward_fn(...), 0, 1):
  y_j = max_i r_i (hard estimation) or mean_i r_i (``soft``); the last step's label is the
  solution's own clipped reward (``monte_carlo_step_labels``). Labels are in [0, 1].

  With ``cache_path`` the records are written there (JSONL, atomically, by process 0) with a
  ``<cache_path>.meta.json`` of the settings and statistics; a later call with the same settings
  reads them back (a resumed run trains on the same data); a cache made with other settings is
  a ``DataError`` (never reused or overwritten), as ``verifier_preference_data``.

  Returns:
    ``(records, info)``: ``info`` has ``reward_stats`` of the solutions, ``label_mean``,
    ``num_prompts``, ``num_records``, ``num_steps`` and ``cached``.
  Raises:
    DataError: no solution had a step, or a cache with other settings.
  """
  prompts = hashlib.sha256("\n".join(p.prompt for p in problems).encode()).hexdigest()
  full = dict(settings or {}, kind="steps", num_samples=num_samples, rollouts=rollouts,
              soft=bool(soft), max_steps=max_steps or 0, max_new_tokens=max_new_tokens,
              temperature=temperature, seed=seed, batch_size=batch_size,
              system_prompt=system_prompt or "", num_problems=len(problems), prompts=prompts)
  full = json.loads(json.dumps(full, default=str))
  meta_path = f"{cache_path}.meta.json" if cache_path else None
  if cache_path and os.path.exists(cache_path) and os.path.exists(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    cached = meta.get("settings", {})
    if cached != full:
      diff = sorted(k for k in set(full) | set(cached) if full.get(k) != cached.get(k))
      raise DataError(f"{cache_path}: cached step data was made with other settings "
                      f"(differing: {diff}); use a new workdir or delete the file")
    records, _ = read_step_jsonl(cache_path)
    return records, dict(meta["info"], cached=True)

  key = jax.random.key(seed)
  samples = sample_and_score(model, tokenizer, problems, reward_fn, num_samples=num_samples,
                             key=key, max_new_tokens=max_new_tokens, temperature=temperature,
                             batch_size=batch_size, system_prompt=system_prompt)
  records = monte_carlo_step_labels(model, tokenizer, problems, samples, reward_fn,
                                    rollouts=rollouts, key=jax.random.fold_in(key, 1), soft=soft,
                                    max_steps=max_steps, max_new_tokens=max_new_tokens,
                                    temperature=temperature, batch_size=batch_size,
                                    system_prompt=system_prompt)
  labels = [y for r in records for y in r.labels]
  info = {"reward_stats": reward_stats(samples), "num_prompts": len(problems),
          "num_records": len(records), "num_steps": len(labels),
          "label_mean": float(np.mean(labels)) if labels else 0.0}
  if not records:
    raise DataError(f"no step records from {len(problems)} prompts x {num_samples} samples: "
                    f"every solution was blank")
  if cache_path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
    write_jsonl(cache_path, records)
    tmp = f"{meta_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"settings": full, "info": info}, f, indent=1, sort_keys=True)
    os.replace(tmp, meta_path)
  return records, dict(info, cached=False)


def verifier_step_records(config, run, workdir: str | None):
  """(train records, held-out records or None, info): ``verifier_step_data`` on the built-in
  task with the initial policy (the frozen base with PEFT), held-out records from the evaluation
  problems (never trained on), both cached in ``workdir/data/{train,eval}_steps.jsonl``."""
  data_cfg = config.data
  eval_problems = (common.task_problems(data_cfg.task, data_cfg.num_eval_prompts,
                                        data_cfg.eval_seed)
                   if data_cfg.num_eval_prompts and not data_cfg.eval_path else [])
  problems = common.held_out_train_problems(data_cfg.task, data_cfg.num_prompts,
                                            data_cfg.train_seed, eval_problems + run.eval_problems)
  model, reward_fn, settings = verifier_data_source(config, run)
  kwargs = dict(rollouts=data_cfg.step_rollouts, soft=data_cfg.step_soft,
                num_samples=data_cfg.num_samples, max_new_tokens=data_cfg.max_new_tokens,
                temperature=data_cfg.temperature, max_steps=data_cfg.max_steps,
                batch_size=data_cfg.sample_batch_size,
                system_prompt=config.get("system_prompt") or None, settings=settings)

  def cache(split):
    return os.path.join(workdir, "data", f"{split}_steps.jsonl") if workdir else None

  train, train_info = verifier_step_data(model, run.tokenizer, problems, reward_fn,
                                         seed=config.seed, cache_path=cache("train"), **kwargs)
  info = {"source": "verifier", "train": train_info}
  held = None
  if eval_problems:
    held, info["eval"] = verifier_step_data(model, run.tokenizer, eval_problems, reward_fn,
                                            seed=config.seed + 1, cache_path=cache("eval"),
                                            **kwargs)
  if jax.process_index() == 0:
    print(f"verifier step data: {len(train)} train solutions ({train_info['num_steps']} steps, "
          f"mean label {train_info['label_mean']:.3f}) from {len(problems)} prompts"
          f"{'' if held is None else f', {len(held)} held-out'}"
          f"{' (read from the cache)' if train_info['cached'] else ''}")
  return train, held, info


def _tokenized_steps(records, config, run, source: str):
  data_cfg = config.data
  data = tokenize_steps(records, run.tokenizer, seq_len=config.seq_len,
                        max_steps=data_cfg.max_steps,
                        system_prompt=config.get("system_prompt") or None,
                        overflow=data_cfg.overflow, source=source)
  if (data.num_truncated or data.num_dropped_steps) and jax.process_index() == 0:
    print(f"{source}: {data.num_truncated} records truncated to seq_len={config.seq_len}, "
          f"{data.num_dropped_steps} steps dropped")
  return data


def _step_data(config, run, workdir: str | None):
  """(train, held-out or None, info) step data: the JSONL files of ``data.path`` /
  ``data.eval_path``, or without ``data.path`` the policy's own labelled solutions."""
  data_cfg = config.data
  files = {}
  for key in ("path", "eval_path"):
    if data_cfg.get(key):
      records, skipped = read_step_jsonl(data_cfg[key],
                                         skip_malformed=data_cfg.get("skip_malformed", False))
      if skipped:
        print(f"skipped {skipped} malformed records in {data_cfg[key]}")
      files[key] = records
  if "path" in files:
    train, held, info = files["path"], files.get("eval_path"), {"source": data_cfg.path}
  else:
    train, held, info = verifier_step_records(config, run, workdir)
    held = files.get("eval_path", held)
  return (_tokenized_steps(train, config, run, data_cfg.path or "train"),
          None if held is None else
          _tokenized_steps(held, config, run, data_cfg.eval_path or "eval"), info)


def _read_step_files_early(data_cfg) -> None:
  """Reads the step files once before the model loads, so a bad file fails at once."""
  for key in ("path", "eval_path"):
    if data_cfg.get(key):
      read_step_jsonl(data_cfg[key], skip_malformed=data_cfg.get("skip_malformed", False))


# ------------------------------------------------------------------------------------- job


def run(config, workdir: str | None) -> dict:
  """Trains a reward model on ``config.data`` with ``config.loss``; evaluates on held-out data
  before and after; saves it with ``config.save_model``."""
  check_config(config)                    # cheap checks first: config, data files, then the model
  optim = common.optimizer_config(config)
  steps = config.data.kind == "steps"
  if steps:
    _read_step_files_early(config.data)
    files = None
  else:
    files = read_preference_files(config.data)
  run_ = common.start(config)
  if steps:
    train, held, info = _step_data(config, run_, workdir)
  else:
    train_records, held_records, info = preference_records(config, run_, workdir, files)
    train = tokenized(train_records, run_, config, "train")
    held = held_out_data(held_records, run_, config) if held_records else None

  use_peft = run_.frozen is not None
  backbone = nnx.merge(run_.graphdef, peft.combine(run_.params, run_.frozen) if use_peft
                       else run_.params)
  rm = ScoredTransformer(backbone, rngs=nnx.Rngs(config.seed))
  backbone_graphdef = nnx.split(rm.backbone)[0]
  frozen = None
  if use_peft:  # the backbone's adapters and the (new) head are trained; the backbone is frozen
    graphdef, params, frozen = peft.split_trainable(rm, modules_to_save=HEAD)
    frozen = jax.tree.map(np.asarray, frozen)
  else:
    graphdef, params = nnx.split(rm)
  params = jax.tree.map(np.asarray, params)
  del rm, backbone
  rm_run = dataclasses.replace(run_, graphdef=graphdef, params=params, frozen=frozen,
                               eval_problems=[])

  extra = None
  if held is not None and steps:
    extra = step_eval(jax.jit(lambda p, b: {"logits": step_logits(graphdef, p, b)}), held,
                      batch_size=config.batch_size, mesh=run_.mesh)
  elif held is not None:
    extra = sequence_eval(jax.jit(lambda p, b: {"scores": sequence_scores(graphdef, p, b)}),
                          held, batch_size=config.batch_size, mesh=run_.mesh,
                          scores_dir=os.path.join(workdir, "eval") if workdir else None)
  result = fit(
      reward_loss_fn(graphdef, config.loss, config.data.kind), params, make_optimizer(optim),
      record_batches(train, batch_size=config.batch_size, seed=config.seed), mesh=run_.mesh,
      total_steps=config.steps, workdir=workdir, seed=config.seed,
      accum_steps=config.accum_steps, save_every=config.checkpoint.every,
      keep_checkpoints=config.checkpoint.keep,
      fingerprint=run_fingerprint(config, run_.model_cfg), log_every=config.log_every,
      lr_schedule=learning_rate_schedule(optim),
      flops_per_token=common.model_flops(run_.model_cfg, config.seq_len),
      eval_fn=common.task_eval_fn(rm_run, config, extra=extra) if extra else None,
      eval_every=config.eval.every, eval_before=config.eval.before, frozen=frozen)

  summary_extra = dict(loss=config.loss.name, num_train_records=len(train),
                       num_eval_records=len(held or ()), num_truncated=train.num_truncated,
                       train_k=getattr(train, "k", None), eval_k=getattr(held, "k", None),
                       seconds_per_step=seconds_per_step(result.history), data=info)
  keys = (("eval/step_accuracy", "eval/step_loss") if steps else
          ("eval/pair_accuracy", "eval/top1_accuracy", "eval/order_accuracy"))
  for key in keys:
    if any(key in h for h in result.history):
      summary_extra.update(before_after(result.history, key))
  # common.finish saves ``run.graphdef`` + params as a causal LM: hand it the backbone, then add
  # the head to the folder it wrote
  # (with PEFT it writes the backbone's adapters and merged backbone: common.save_peft)
  backbone_result = dataclasses.replace(result, state=dataclasses.replace(
      result.state, params=result.state.params["backbone"]))
  summary = common.finish(dataclasses.replace(
      rm_run, graphdef=backbone_graphdef, frozen=None if frozen is None else frozen["backbone"]),
      config, workdir, backbone_result, **summary_extra)
  head = result.state.params["head"]
  if workdir and use_peft:
    save_head_file(head, os.path.join(workdir, HEAD_FILE))
  merged = not use_peft or config.peft.method not in ("prompt", "prefix")
  if workdir and config.get("save_model") and merged:
    save_head(head, f"{workdir}/model", run_.tokenizer, config)
  elif workdir and config.get("save_model") and jax.process_index() == 0:
    print(f"no merged model for config.peft.method={config.peft.method}: the reward model is "
          f"{workdir}/{peft.ADAPTER_FILE} + {workdir}/{HEAD_FILE}")
  return summary


def save_head_file(head_params, path: str) -> None:
  """Gathers the (sharded) head and writes ``score.weight`` [1, D] / ``score.bias`` [1] (the HF
  sequence-classification layout) as a safetensors file (PEFT runs: the head beside the
  adapters)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from postrl.models.weights import write_safetensors  # pylint: disable=import-outside-toplevel
  head = multihost_utils.process_allgather(head_params, tiled=True)
  if jax.process_index() == 0:
    write_safetensors(path, {"score.weight": np.asarray(head["kernel"][...], np.float32).T,
                             "score.bias": np.asarray(head["bias"][...], np.float32).reshape(1)})
    print(f"wrote {path}")


def save_head(head_params, path: str, tokenizer, config) -> None:
  """Gathers the (sharded) head and writes it into the HF folder ``common.finish`` saved."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from postrl.rewards.reward_model import write_score_head
  head = multihost_utils.process_allgather(head_params, tiled=True)
  if jax.process_index() == 0:
    write_score_head(path, np.asarray(head["kernel"][...]), np.asarray(head["bias"][...]),
                     tokenizer, system_prompt=config.get("system_prompt") or None,
                     max_len=config.seq_len)
    print(f"wrote the reward head to {path} (loads with postrl.rewards.RewardModelScorer or "
          f"transformers' AutoModelForSequenceClassification)")


def run_fingerprint(config, model_cfg) -> dict:
  """What a checkpoint must match to be resumed (the model, data, loss, optimizer, batch)."""
  return common.fingerprint(config, model_cfg, "batch_size", "accum_steps", "seq_len",
                            "system_prompt", sections=("data", "optim", "loss", "peft"))
