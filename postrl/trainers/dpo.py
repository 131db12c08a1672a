"""Preference optimisation: DPO (every ``postrl.losses.DPO_VARIANTS`` variant), listwise DPO, KTO,
ORPO, SimPO and CPO on pairs or rankings.

Each record's K responses (K = 2 for a pair, chosen first) are scored by their sequence log-prob
under the policy, the sum of the response tokens' log-probs from ``postrl.logprobs.token_logps``:

    log π(y|x) = Σ_t m_t log π(y_t | x, y_<t)       (m = 1 on response tokens)
    avg log π(y|x) = log π(y|x) / Σ_t m_t            (SimPO, ORPO; CPO's and ORPO's NLL term)

and the loss picked by ``config.loss.name`` is applied to them (formulas and papers: the loss
functions' docstrings and docs/losses.md):

  dpo           ``dpo(..., variant=config.loss.variant)``: Rafailov et al. 2023 and 13 variants
  listwise_dpo  Plackett-Luce DPO over K ranked responses (Rafailov et al. 2023, App. A.3)
  kto           Ethayarajh et al. 2024 on unpaired data derived from the pairs: every chosen
                response is a desirable example and every rejected one an undesirable example
                (so the data is balanced, λ_D n_D / λ_U n_U = 1). The reference point z is the
                micro-batch mean of log π - log π_ref over those 2B examples, clamped at 0 and
                held constant, instead of the paper's mismatched (x_i, y_j) pairs (which need
                extra forward passes); it is therefore a per-micro-batch quantity.
  orpo, simpo, cpo  reference-free (Hong et al. 2024; Meng et al. 2024; Xu et al. 2024)

The reference log-probs log π_ref(y|x) come from the initial parameters, either computed once over
the whole dataset before training and cached in ``workdir/reference/<hash>.npz`` (keyed by the
tokenised data and the parameters, so a resumed run reuses them; ``config.loss.reference =
"cached"``), or recomputed for every batch from a frozen copy of the parameters (``"online"``: no
pass over the data up front, one more forward per step and one more copy of the parameters in
memory). Both give the same losses. Reference-free losses skip it.

PEFT (``config.peft``, ``postrl.peft``): only the adapters are trained; the policy is
``combine(adapters, frozen base)`` everywhere (loss, evaluation). The reference is the frozen base
*without* adapters (``postrl.peft.base_view``; TRL's "adapters disabled" reference for PEFT
models). For LoRA / DoRA / QLoRA this is exactly the policy at initialisation (B = 0, DoRA's
magnitude = ‖W‖), for prompt / prefix tuning it is the pretrained model without the virtual
tokens (whose initial implicit rewards are then not zero). It never moves (the base is not
trained) and no second copy of the model is kept: the cached mode places the base once before
training and frees it after its pass over the data; the online mode reads the base out of the
policy's parameters each step (the frozen arrays ``fit`` already holds on the devices).
Verifier-made data is sampled from the same reference model.

Metrics: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``,
``rewards/accuracy`` (implicit rewards β (log π - log π_ref), chosen > rejected; for the
reference-free losses their own rewards), ``logps/*``. Evaluation (before and after training):
greedy exact-match task accuracy on held-out problems, and on held-out preference data
``pref_accuracy`` / ``pref_margin`` (implicit rewards; both 0 before training, where π = π_ref),
``logp_accuracy`` (log π(chosen) > log π(rejected): the policy's own preference) and
``avg_logp_accuracy`` (the same per token).

The data (``config.data``): a JSONL file of pairs / rankings (``path``, ``eval_path``), or pairs
or rankings the model makes itself on a built-in task (``postrl.data.preference.
verifier_preference_data``: samples scored by the task's verifier), cached in
``workdir/data/`` so a resumed run trains on exactly the same data; the evaluation pairs come
from held-out problems.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postrl import peft
from postrl import sharding as shd
from postrl.data.preference import (KINDS, OVERFLOW_MODES, REWARD_KINDS, local_rows,
                                    pairwise_accuracy, sequential_batches, record_batches,
                                    tokenize_preferences, verifier_preference_data,
                                    verifier_reward)
from postrl.data.records import DataError, read_jsonl
from postrl.logprobs import model_apply_fn, token_logps
from postrl.losses import DPO_VARIANTS, cpo, dpo, kto, listwise_dpo, orpo, simpo
from postrl.models import ConfigError
from postrl.sampling.generate import to_host
from postrl.trainers import common
from postrl.trainers.loop import fit
from postrl.trainers.step import learning_rate_schedule, make_optimizer

LOSS_NAMES = ("dpo", "listwise_dpo", "kto", "orpo", "simpo", "cpo")
REFERENCE_FREE = ("orpo", "simpo", "cpo")
PAIRWISE = ("dpo", "kto", "orpo", "simpo", "cpo")
REFERENCE_MODES = ("cached", "online")
# config.loss fields each loss reads besides beta (the DPO variants': from their signatures)
_LOSS_OPTIONS = {"orpo": ("lam",), "simpo": ("gamma",), "cpo": ("alpha",),
                 "kto": ("desirable_weight", "undesirable_weight")}


# ------------------------------------------------------------------------------------ losses


def sequence_logps(apply_fn, params, batch, *, chunk=None, vocab_chunk=None):
  """(log π(y_k|x) summed over response tokens, number of response tokens), both [b, K], for a
  batch of ``tokens`` / ``segment_ids`` / ``loss_mask`` [b, K, T] (``postrl.data.preference``)."""
  tokens = batch["tokens"]
  b, K, T = tokens.shape
  flat = lambda x: x.reshape(b * K, T)  # noqa: E731
  mask = flat(batch["loss_mask"]).astype(jnp.float32)
  logps = token_logps(apply_fn, params, flat(tokens), mask, chunk=chunk, vocab_chunk=vocab_chunk,
                      segment_ids_BxT=flat(batch["segment_ids"]))
  return logps.sum(-1).reshape(b, K), mask.sum(-1).reshape(b, K)


def loss_options(loss_cfg) -> dict:
  """The hyper-parameters ``preference_loss`` passes to ``loss_cfg.name`` (besides beta)."""
  if loss_cfg.name == "dpo":
    fn = DPO_VARIANTS.get(loss_cfg.variant)
    names = [] if fn is None else [
        n for n, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("beta", "label_smoothing")]
  else:
    names = _LOSS_OPTIONS.get(loss_cfg.name, ())
  missing = [n for n in names if n not in loss_cfg]
  if missing:
    raise ConfigError(f"config.loss needs field(s) {missing} for {loss_cfg.name!r}")
  return {n: loss_cfg[n] for n in names}


def _pair_reward_metrics(rewards_BxK, mask_BxK) -> dict:
  """``rewards/*`` of implicit rewards: column 0 chosen vs the last present response."""
  last = jnp.maximum(jnp.sum(mask_BxK > 0, axis=-1) - 1, 0)
  rc = rewards_BxK[:, 0]
  rr = jnp.take_along_axis(rewards_BxK, last[:, None], axis=-1)[:, 0]
  return {"rewards/chosen": jnp.mean(rc), "rewards/rejected": jnp.mean(rr),
          "rewards/margin": jnp.mean(rc - rr),
          "rewards/accuracy": jnp.mean((rc > rr).astype(jnp.float32))}


def preference_loss(name: str, logps_BxK, lengths_BxK, ref_logps_BxK, mask_BxK, *, beta: float,
                    variant: str = "sigmoid", label_smoothing: float = 0.0, **options):
  """The loss ``name`` (``LOSS_NAMES``) of sequence log-probs; returns ``(loss, metrics)``.

  Args:
    name: dpo, listwise_dpo, kto, orpo, simpo or cpo.
    logps_BxK: log π_θ(y_k|x) summed over response tokens; column 0 the best (chosen).
    lengths_BxK: response tokens per response (the length normalisation of SimPO / ORPO / the
      NLL terms of ORPO and CPO: NLL(y_w) = -log π(y_w|x) / |y_w|).
    ref_logps_BxK: log π_ref(y_k|x) (None for the reference-free losses).
    mask_BxK: 1 for responses present (pairs: all 1).
    beta: β (unused by orpo, which has λ = ``lam``).
    variant, label_smoothing: the DPO variant and its ε (``dpo``).
    **options: the loss's other hyper-parameters (``loss_options``).
  """
  lp = logps_BxK.astype(jnp.float32)
  avg = lp / jnp.maximum(lengths_BxK.astype(jnp.float32), 1.0)
  if name == "listwise_dpo":
    return listwise_dpo(lp, ref_logps_BxK, beta=beta, mask_BxK=mask_BxK)
  if name == "dpo":
    loss, metrics = dpo(lp[:, 0], lp[:, 1], ref_logps_BxK[:, 0], ref_logps_BxK[:, 1], beta=beta,
                        variant=variant, label_smoothing=label_smoothing, **options)
    return loss, metrics
  if name == "kto":
    b = lp.shape[0]
    ref = ref_logps_BxK.astype(jnp.float32)
    flat_lp, flat_ref = lp[:, :2].reshape(2 * b), ref[:, :2].reshape(2 * b)
    desirable = jnp.tile(jnp.array([True, False]), b)     # chosen, rejected, chosen, ...
    z = jax.lax.stop_gradient(jnp.mean(flat_lp - flat_ref))  # the reference point (module doc)
    loss, metrics = kto(flat_lp, flat_ref, desirable, z, beta=beta, **options)
    r = jax.lax.stop_gradient(beta * (lp - ref))
    metrics["rewards/accuracy"] = jnp.mean((r[:, 0] > r[:, 1]).astype(jnp.float32))
    return loss, metrics
  if name == "orpo":
    return orpo(avg[:, 0], avg[:, 1], -avg[:, 0], **options)
  if name == "simpo":
    return simpo(avg[:, 0], avg[:, 1], beta=beta, **options)
  if name == "cpo":
    return cpo(lp[:, 0], lp[:, 1], -avg[:, 0], beta=beta, **options)
  raise ValueError(f"unknown preference loss {name!r}; expected one of {LOSS_NAMES}")


def preference_loss_fn(apply_fn, loss_cfg, *, chunk=None, vocab_chunk=None):
  """``loss_fn(params, batch)`` for ``fit``: ``preference_loss`` of the batch's sequence
  log-probs, with ``batch["ref_logps"]`` [b, K] as the reference (cached or online). The mean is
  over the b records (``loss_weight`` = b), so gradient accumulation is exact except for the
  losses that couple a batch's rows (the AOT variants' sorting, KTO's reference point)."""
  options = loss_options(loss_cfg)
  name = loss_cfg.name

  def loss_fn(params, batch):
    logps, lengths = sequence_logps(apply_fn, params, batch, chunk=chunk, vocab_chunk=vocab_chunk)
    ref = batch.get("ref_logps")
    loss, metrics = preference_loss(
        name, logps, lengths, None if ref is None else jax.lax.stop_gradient(ref),
        batch["response_mask"], beta=loss_cfg.beta, variant=loss_cfg.get("variant", "sigmoid"),
        label_smoothing=loss_cfg.get("label_smoothing", 0.0), **options)
    return loss, dict(metrics, loss_weight=jnp.asarray(logps.shape[0], jnp.float32))

  return loss_fn


def check_loss_config(config) -> None:
  """Raises ``ConfigError`` naming the key for a bad ``config.loss`` / ``config.data.kind``,
  before anything slow: the loss is evaluated once on dummy inputs, so its own checks
  (variant options, label smoothing ranges) fail here and not inside a jitted step."""
  loss_cfg = config.loss
  if loss_cfg.name not in LOSS_NAMES:
    raise ConfigError(f"config.loss.name: unknown loss {loss_cfg.name!r}; expected one of "
                      f"{LOSS_NAMES}")
  if loss_cfg.name == "dpo" and loss_cfg.variant not in DPO_VARIANTS:
    raise ConfigError(f"config.loss.variant: unknown DPO variant {loss_cfg.variant!r}; expected "
                      f"one of {sorted(DPO_VARIANTS)}")
  if loss_cfg.reference not in REFERENCE_MODES:
    raise ConfigError(f"config.loss.reference: expected one of {REFERENCE_MODES}, got "
                      f"{loss_cfg.reference!r}")
  beta = loss_cfg.get("beta")
  if loss_cfg.name != "orpo" and not (isinstance(beta, numbers.Real) and math.isfinite(beta)
                                      and beta > 0):
    # β = 0 gives the loss no gradient, β < 0 trains toward the rejected response: both silently
    raise ConfigError(f"config.loss.beta: must be a finite number > 0 for {loss_cfg.name!r}, "
                      f"got {beta!r}")
  check_data_config(config.data)
  if loss_cfg.name in PAIRWISE and config.data.kind != "pairs":
    raise ConfigError(f"config.loss.name={loss_cfg.name!r} trains on pairs; set "
                      f"config.data.kind='pairs' (or use listwise_dpo for rankings)")
  zeros = jnp.zeros((2, 2), jnp.float32)
  try:
    preference_loss(loss_cfg.name, zeros, zeros + 1, zeros, jnp.ones((2, 2)), beta=loss_cfg.beta,
                    variant=loss_cfg.get("variant", "sigmoid"),
                    label_smoothing=loss_cfg.get("label_smoothing", 0.0),
                    **loss_options(loss_cfg))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.loss: {e}") from None


def check_data_config(data_cfg) -> None:
  if data_cfg.kind not in KINDS:
    raise ConfigError(f"config.data.kind: expected one of {KINDS}, got {data_cfg.kind!r}")
  if data_cfg.overflow not in OVERFLOW_MODES:
    raise ConfigError(f"config.data.overflow: expected one of {OVERFLOW_MODES}, got "
                      f"{data_cfg.overflow!r}")
  if data_cfg.reward not in REWARD_KINDS:
    raise ConfigError(f"config.data.reward: expected one of {REWARD_KINDS}, got "
                      f"{data_cfg.reward!r}")


# ------------------------------------------------------------------------------------ data


def _schema(kind: str) -> str:
  return "preference" if kind == "pairs" else "ranking"


def read_preference_files(data_cfg) -> tuple[list | None, list | None]:
  """Records of ``data.path`` / ``data.eval_path`` (None where not set): read before the model
  loads, so a bad file fails at once."""
  out = []
  for key in ("path", "eval_path"):
    path = data_cfg.get(key)
    if not path:
      out.append(None)
      continue
    records, skipped = read_jsonl(path, _schema(data_cfg.kind),
                                  skip_malformed=data_cfg.get("skip_malformed", False))
    if skipped:
      print(f"skipped {skipped} malformed records in {path}")
    out.append(records)
  return out[0], out[1]


def preference_records(config, run, workdir: str | None, files=(None, None)):
  """(train records, held-out records or None, info) from ``config.data``: the JSONL files
  already read (``read_preference_files``), else verifier-made data on the built-in task, with
  held-out records from the evaluation problems (never trained on), cached in ``workdir/data``."""
  data_cfg = config.data
  train, held = files
  if train is not None:
    return train, held, {"source": data_cfg.path}
  eval_problems = (common.task_problems(data_cfg.task, data_cfg.num_eval_prompts,
                                        data_cfg.eval_seed) if data_cfg.num_eval_prompts else [])
  problems = common.held_out_train_problems(data_cfg.task, data_cfg.num_prompts,
                                            data_cfg.train_seed, eval_problems + run.eval_problems)
  model, reward_fn, settings = verifier_data_source(config, run)
  kwargs = dict(kind=data_cfg.kind, num_samples=data_cfg.num_samples,
                max_new_tokens=data_cfg.max_new_tokens, temperature=data_cfg.temperature,
                pairs_per_prompt=data_cfg.pairs_per_prompt, k=data_cfg.k,
                batch_size=data_cfg.sample_batch_size,
                system_prompt=config.get("system_prompt") or None, settings=settings)

  def cache(split):
    return os.path.join(workdir, "data", f"{split}_{data_cfg.kind}.jsonl") if workdir else None

  train, train_info = verifier_preference_data(model, run.tokenizer, problems, reward_fn,
                                               seed=config.seed, cache_path=cache("train"),
                                               **kwargs)
  info = {"source": "verifier", "train": train_info}
  held = None
  if eval_problems:
    try:
      held, info["eval"] = verifier_preference_data(model, run.tokenizer, eval_problems,
                                                    reward_fn, seed=config.seed + 1,
                                                    cache_path=cache("eval"), **kwargs)
    except DataError as e:  # no held-out pairs is worth a warning, not a failed run
      print(f"warning: no held-out preference data: {e}")
  if jax.process_index() == 0:
    print(f"verifier data: {len(train)} train {data_cfg.kind} from {len(problems)} prompts"
          f"{'' if held is None else f', {len(held)} held-out'}"
          f"{' (read from the cache)' if train_info['cached'] else ''}; reward stats "
          f"{json.dumps(train_info['reward_stats'])}")
  return train, held, info


def tokenized(records, run, config, source: str):
  data = tokenize_preferences(records, run.tokenizer, seq_len=config.seq_len,
                              system_prompt=config.get("system_prompt") or None,
                              overflow=config.data.overflow, source=source,
                              k=config.data.k if config.data.kind == "rankings" else None)
  if data.num_truncated and jax.process_index() == 0:
    print(f"{source}: {data.num_truncated} responses truncated to fit seq_len={config.seq_len}")
  return data


# ---------------------------------------------------------------------- the reference model


def verifier_data_source(config, run) -> tuple:
  """(sampling model, reward function, cache settings) for data made by the model itself: the
  initial policy (the frozen base with PEFT), ``config.data``'s verifier reward, and what a cached
  data file must have been made with (model, dtypes, task, reward; the base's quantization for
  QLoRA, whose sampling model is quantized)."""
  data_cfg = config.data
  model = nnx.merge(*reference_model(run))
  reward_fn = verifier_reward(data_cfg.task.name, data_cfg.reward)
  settings = dict(model=config.model, param_dtype=config.param_dtype, dtype=config.dtype,
                  task=data_cfg.task.to_dict(), reward=data_cfg.reward)
  if run.peft is not None and run.peft.method == "qlora":
    settings["base_quant"] = run.peft.get("quant", "nf4_dq")
  return model, reward_fn, settings


def reference_model(run) -> tuple:
  """(graphdef, host params) of the reference policy π_ref: the initial parameters, or with PEFT
  (``run.frozen`` set) the frozen base without adapters (``postrl.peft.base_view``; its arrays
  are ``run.frozen``'s, not a copy)."""
  if run.frozen is None:
    return run.graphdef, run.params
  full = peft.combine(run.params, run.frozen)
  graphdef, to_base = peft.base_view(run.graphdef, full)
  return graphdef, to_base(full)


# ---------------------------------------------------------------------- passes over a dataset


def place_params(params, mesh):
  """Host parameters -> global arrays sharded by their logical axes (as ``fit`` places them)."""
  return shd.put_global(params, shd.state_shardings(params, mesh))


def apply_over_dataset(fn, params, data, *, batch_size: int, mesh,
                       per_record=None) -> dict[str, np.ndarray]:
  """Runs the jitted ``fn(params, batch) -> {name: [b, ...]}`` over every record of ``data`` once
  (fixed-shape batches of ``batch_size`` records, rows sharded over the mesh's batch axes) and
  returns ``{name: [N, ...]}`` on every process."""
  index, count = jax.process_index(), jax.process_count()
  outs = []
  for batch, n in sequential_batches(data, batch_size=batch_size, per_record=per_record):
    out = fn(params, shd.put_batch(local_rows(batch, index, count), mesh))
    outs.append({k: to_host(v)[:n] for k, v in out.items()})
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def response_masks(data) -> np.ndarray:
  """[N, K] int32: 1 for the responses each record has."""
  out = np.zeros((len(data), data.k), np.int32)
  for i, ex in enumerate(data.examples):
    out[i, :len(ex.response_ids)] = 1
  return out


def params_fingerprint(params) -> str:
  """sha256 of every parameter's bytes, shape and dtype (host arrays)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _agree(flag: bool) -> bool:
  """Process 0's ``flag`` on every process (so collective work is done by all or by none)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def reference_logps(seq_fn, params, datasets: dict, *, config, workdir, mesh):
  """``{name: log π_ref [N, K]}`` of each dataset under the initial ``params`` (host copy), read
  from ``workdir/reference/<key>.npz`` when it exists, else computed and written there. The key
  hashes the tokenised data, the parameters and the compute dtype."""
  key = hashlib.sha256(json.dumps(
      [{n: d.fingerprint() for n, d in datasets.items()}, params_fingerprint(params),
       config.dtype, config.get("logprob_chunk"), config.get("vocab_chunk")]).encode()).hexdigest()
  path = os.path.join(workdir, "reference", f"{key[:32]}.npz") if workdir else None
  if path and _agree(os.path.exists(path)):
    with np.load(path) as f:
      if jax.process_index() == 0:
        print(f"reference log-probs read from {path}")
      return {n: f[n] for n in datasets}
  placed = place_params(params, mesh)
  out = {n: apply_over_dataset(seq_fn, placed, d, batch_size=config.batch_size, mesh=mesh)["logps"]
         for n, d in datasets.items()}
  del placed
  if path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
  return out


class OnlineReference:
  """A batch source that adds ``ref_logps`` computed from frozen reference parameters to every
  batch of ``batches`` (``fit`` calls ``next_batch``); the data position is ``batches``'.

  ``ref_params``: the reference's own (placed) parameters; or ``from_policy(params)``: the
  reference read out of the policy's current full parameters (PEFT: the frozen base inside
  them, ``postrl.peft.base_view``), so no second copy of the model is kept."""

  def __init__(self, batches, seq_fn, ref_params, mesh, *, from_policy=None):
    if (ref_params is None) == (from_policy is None):
      raise ValueError("OnlineReference needs exactly one of ref_params and from_policy")
    self._batches, self._fn, self._params, self._mesh = batches, seq_fn, ref_params, mesh
    self._from_policy = from_policy

  def next_batch(self, params, step):
    del step
    batch = next(self._batches)
    ref = self._params if self._from_policy is None else self._from_policy(params)
    out = to_host(self._fn(ref, shd.put_batch(batch, self._mesh))["logps"])
    rows = len(batch["tokens"])
    mine = out[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    return dict(batch, ref_logps=mine.astype(np.float32))

  def get_state(self):
    return self._batches.get_state()

  def set_state(self, state):
    self._batches.set_state(state)


def preference_eval(seq_fn, data, ref_logps, *, beta: float, batch_size: int, mesh):
  """``extra(params, step)`` for ``common.task_eval_fn``: held-out preference metrics (module
  doc) from the policy's sequence log-probs on ``data``."""
  mask = response_masks(data)
  last = np.maximum(mask.sum(-1) - 1, 0)

  def extra(params, step):
    del step
    out = apply_over_dataset(seq_fn, params, data, batch_size=batch_size, mesh=mesh)
    reward = beta * (out["logps"] - ref_logps)
    margin = reward[:, 0] - reward[np.arange(len(reward)), last]
    return {"pref_accuracy": pairwise_accuracy(reward, mask), "pref_margin": float(margin.mean()),
            "logp_accuracy": pairwise_accuracy(out["logps"], mask),
            "avg_logp_accuracy": pairwise_accuracy(
                out["logps"] / np.maximum(out["lengths"], 1), mask)}

  return extra


def before_after(history, key: str) -> dict:
  """``{<name>_before, <name>_after}`` of an eval metric ``eval/<name>`` in ``fit``'s history."""
  before, after = common.eval_history(history, key)
  name = key.split("/", 1)[1]
  return {f"{name}_before": None if before is None else before[key],
          f"{name}_after": None if after is None else after[key]}


def seconds_per_step(history) -> float | None:
  """Median training step time after the first step (which includes compilation); the median
  also ignores steps slowed by a checkpoint or another process."""
  times = [h["perf/step_seconds"] for h in history if "perf/step_seconds" in h][1:]
  return round(float(np.median(times)), 3) if times else None


# ------------------------------------------------------------------------------------- job


def run(config, workdir: str | None) -> dict:
  """Preference-optimises ``config.model`` on ``config.data`` with ``config.loss``; evaluates
  task accuracy and held-out preference accuracy before and after."""
  check_loss_config(config)               # cheap checks first: config, data files, then the model
  optim = common.optimizer_config(config)
  files = read_preference_files(config.data)
  run_ = common.start(config)
  train_records, held_records, info = preference_records(config, run_, workdir, files)
  train = tokenized(train_records, run_, config, "train")
  held = tokenized(held_records, run_, config, "eval") if held_records else None

  loss_cfg = config.loss
  apply_fn = model_apply_fn(run_.graphdef)
  chunks = dict(chunk=config.get("logprob_chunk"), vocab_chunk=config.get("vocab_chunk"))
  seq_fn = jax.jit(lambda p, b: dict(zip(("logps", "lengths"),
                                         sequence_logps(apply_fn, p, b, **chunks))))
  # the reference: the initial params, or with PEFT the frozen base without adapters (module doc)
  ref_graphdef, ref_params = reference_model(run_)
  ref_apply = model_apply_fn(ref_graphdef)
  ref_seq_fn = seq_fn if run_.frozen is None else jax.jit(
      lambda p, b: dict(zip(("logps", "lengths"), sequence_logps(ref_apply, p, b, **chunks))))
  needs_ref = loss_cfg.name not in REFERENCE_FREE
  online = needs_ref and loss_cfg.reference == "online"
  to_cache = {"train": train} if needs_ref and not online else {}
  if held is not None:  # evaluation always reports implicit rewards against the reference
    to_cache["eval"] = held
  ref = reference_logps(ref_seq_fn, ref_params, to_cache, config=config, workdir=workdir,
                        mesh=run_.mesh) if to_cache else {}

  per_record = {"ref_logps": ref["train"].astype(np.float32)} if "train" in ref else None
  batches = record_batches(train, batch_size=config.batch_size, seed=config.seed,
                           per_record=per_record)
  if online and run_.frozen is None:
    batches = OnlineReference(batches, seq_fn, place_params(run_.params, run_.mesh), run_.mesh)
  elif online:  # the base inside the policy's params: the frozen arrays fit placed, no copy
    to_base = peft.base_view(run_.graphdef, peft.combine(run_.params, run_.frozen))[1]
    batches = OnlineReference(batches, ref_seq_fn, None, run_.mesh, from_policy=to_base)
  del ref_params
  extra = (preference_eval(seq_fn, held, ref["eval"], beta=loss_cfg.beta,
                           batch_size=config.batch_size, mesh=run_.mesh)
           if held is not None else None)
  result = fit(
      preference_loss_fn(apply_fn, loss_cfg, **chunks), run_.params, make_optimizer(optim),
      batches, mesh=run_.mesh, total_steps=config.steps, workdir=workdir, seed=config.seed,
      accum_steps=config.accum_steps, save_every=config.checkpoint.every,
      keep_checkpoints=config.checkpoint.keep,
      fingerprint=run_fingerprint(config, run_.model_cfg), log_every=config.log_every,
      lr_schedule=learning_rate_schedule(optim),
      flops_per_token=common.model_flops(run_.model_cfg, config.seq_len),
      eval_fn=(common.task_eval_fn(run_, config, extra=extra)
               if run_.eval_problems or extra else None),
      eval_every=config.eval.every, eval_before=config.eval.before, frozen=run_.frozen)
  summary_extra = dict(loss=loss_cfg.name, variant=loss_cfg.get("variant"),
                       reference=None if not needs_ref else loss_cfg.reference,
                       num_train_records=len(train), num_eval_records=len(held or ()),
                       num_truncated=train.num_truncated + (held.num_truncated if held else 0),
                       seconds_per_step=seconds_per_step(result.history), data=info)
  for key in ("eval/pref_accuracy", "eval/pref_margin", "eval/logp_accuracy"):
    summary_extra.update(before_after(result.history, key))
  return common.finish(run_, config, workdir, result, **summary_extra)


def run_fingerprint(config, model_cfg) -> dict:
  """What a checkpoint must match to be resumed: the model, the data, the loss, the optimizer and
  the batch layout."""
  return common.fingerprint(config, model_cfg, "batch_size", "accum_steps", "seq_len",
                            "system_prompt", sections=("data", "optim", "loss", "peft"))
