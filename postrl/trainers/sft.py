"""Supervised fine-tuning: maximise the log-likelihood of reference completions.

    L(θ) = - Σ_{b,t} m[b,t] log π_θ(x[b,t] | x[b,<t]) / Σ_{b,t} m[b,t]

with m = 1 on completion tokens (the prompt and the chat template's prompt part are not trained),
a token mean over the whole global batch (exact under gradient accumulation: the loss reports
Σ m as its weight). Log-probs come from ``postrl.logprobs.token_logps`` (chunked over sequence and
vocabulary when configured, so the [B, T, V] logits never materialise).

The job behind ``configs/sft_arith.py``: ``run(config, workdir)`` loads the model, builds the data,
evaluates on held-out problems, trains with the shared loop (``postrl.trainers.loop.fit``),
evaluates again and writes ``results.json`` with both accuracies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postrl import sharding as shd
from postrl.data.pipeline import sft_batches
from postrl.data.records import ArrayRecordRecords, read_jsonl
from postrl.data.tasks import arithmetic_problems, countdown_problems, sft_records
from postrl.logprobs import model_apply_fn, token_logps
from postrl.losses import aggregate
from postrl.metrics import model_flops_per_token
from postrl.models import ConfigError, load_pretrained, load_tokenizer
from postrl.trainers.loop import fit
from postrl.trainers.step import OptimizerConfig, learning_rate_schedule, make_optimizer


def sft_loss_fn(apply_fn, *, chunk: int | None = None, vocab_chunk: int | None = None):
  """``loss_fn(params, batch)`` for SFT; batch: int32 ``tokens``, ``segment_ids``, ``loss_mask``
  [B, T] (``postrl.data.pipeline.sft_batches``). ``loss_weight`` = number of loss tokens (the
  step reports their total over the batch)."""

  def loss_fn(params, batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    logps = token_logps(apply_fn, params, batch["tokens"], mask, chunk=chunk,
                        vocab_chunk=vocab_chunk, segment_ids_BxT=batch["segment_ids"])
    return aggregate(-logps, mask, mode="token_mean"), {"loss_weight": mask.sum()}

  return loss_fn


def model_flops(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token of ``model_cfg`` at ``seq_len`` (6N + attention, see metrics)."""
  n = model_cfg.num_params()
  embed = model_cfg.vocab_size * model_cfg.hidden_size
  # the tied/untied output projection is a matmul per token and counts; the embedding lookup does not
  non_embedding = n - embed + (embed if model_cfg.tie_word_embeddings else 0)
  return model_flops_per_token(num_params_non_embedding=non_embedding,
                               num_layers=model_cfg.num_hidden_layers,
                               hidden_size=model_cfg.hidden_size, seq_len=seq_len)


TASKS = {"arithmetic": arithmetic_problems, "countdown": countdown_problems}


def task_problems(task_cfg, n: int, seed: int):
  """``n`` problems of the built-in task ``task_cfg.name`` with its other fields as arguments."""
  kwargs = {k: v for k, v in task_cfg.items() if k != "name"}
  if task_cfg.name not in TASKS:
    raise ConfigError(f"config.data.task.name: unknown task {task_cfg.name!r}; "
                      f"known: {sorted(TASKS)}")
  try:
    return TASKS[task_cfg.name](n, seed=seed, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.data.task: {e} (fields: {sorted(kwargs)})") from e


def training_records(data_cfg, eval_problems):
  """SFT records from ``data.path`` (JSONL, or array_record written by ``write_array_record``)
  or from a built-in task, minus the evaluation prompts."""
  if data_cfg.get("path", "").endswith(".array_record"):
    return ArrayRecordRecords(data_cfg.path, "sft")
  if data_cfg.get("path"):
    records, skipped = read_jsonl(data_cfg.path, "sft",
                                  skip_malformed=data_cfg.get("skip_malformed", False))
    if skipped:
      print(f"skipped {skipped} malformed records in {data_cfg.path}")
    return records
  held_out = {p.prompt for p in eval_problems}
  problems = [p for p in task_problems(data_cfg.task, data_cfg.num_train, data_cfg.train_seed)
              if p.prompt not in held_out]  # never train on an evaluation problem
  return sft_records(problems)


def run(config, workdir: str | None) -> dict:
  """Fine-tunes ``config.model`` on ``config.data``; evaluates before and after."""
  from postrl.evaluate import evaluate_task  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  # cheap checks first: data, then the mesh, then the (slow) model load
  eval_problems = task_problems(config.data.task, config.eval.num_problems,
                                config.data.eval_seed)
  records = training_records(config.data, eval_problems)
  mesh = shd.make_mesh([tuple(a) for a in config.mesh])
  model = load_pretrained(config.model, param_dtype=config.param_dtype, dtype=config.dtype)
  tokenizer = load_tokenizer(config.model)
  model_cfg = model.config
  graphdef, params = nnx.split(model)
  # a host copy: the device copy is freed here, and fit places each shard where it belongs
  params = jax.tree.map(np.asarray, params)
  del model
  batches = sft_batches(records, tokenizer, batch_size=config.batch_size, seq_len=config.seq_len,
                        pack=config.data.pack, seed=config.seed)
  optim = OptimizerConfig(total_steps=config.steps, **config.optim.to_dict())

  eval_records: dict[int, list] = {}  # step -> per-problem completions

  def eval_fn(params, step):
    model = nnx.merge(graphdef, params)
    accuracy, recs, n_tokens = evaluate_task(
        model, tokenizer, eval_problems, batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens, temperature=0.0, seed=config.seed,
        progress=False)
    if jax.process_index() == 0:
      print(f"step {step}: exact-match accuracy {accuracy:.1%} on {len(recs)} held-out problems "
            f"({n_tokens} tokens generated)")
    eval_records[step] = recs
    return {"accuracy": accuracy, "generated_tokens": n_tokens}

  evaluating = config.eval.num_problems > 0
  fingerprint = run_fingerprint(config, model_cfg)
  result = fit(
      sft_loss_fn(model_apply_fn(graphdef), chunk=config.get("logprob_chunk"),
                  vocab_chunk=config.get("vocab_chunk")),
      params, make_optimizer(optim), batches, mesh=mesh, total_steps=config.steps,
      workdir=workdir, seed=config.seed, accum_steps=config.accum_steps,
      save_every=config.checkpoint.every, keep_checkpoints=config.checkpoint.keep,
      fingerprint=fingerprint, log_every=config.log_every,
      lr_schedule=learning_rate_schedule(optim),
      flops_per_token=model_flops(model_cfg, config.seq_len),
      eval_fn=eval_fn if evaluating else None, eval_every=config.eval.every,
      eval_before=config.eval.before)
  evals = [h for h in result.history if "eval/accuracy" in h]
  before = next((h for h in evals if h["step"] == 0), None)
  after = evals[-1] if evals and evals[-1]["step"] > 0 else None
  train_losses = [h["loss"] for h in result.history if "loss" in h]
  summary = dict(
      model=config.model, steps=int(jax.device_get(result.state.step)),
      preempted=result.preempted, resumed_from=result.resumed_from,
      accuracy_before=None if before is None else before["eval/accuracy"],
      accuracy_after=None if after is None else after["eval/accuracy"],
      first_loss=train_losses[0] if train_losses else None,
      last_loss=train_losses[-1] if train_losses else None,
      num_train_records=len(records), num_eval_problems=len(eval_problems),
      seconds=round(time.perf_counter() - t_start, 1), device=jax.devices()[0].device_kind,
      num_devices=jax.device_count())
  print(json.dumps(summary, indent=1))
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      last = max(eval_records, default=0)
      json.dump(dict(summary, config=config.to_dict(), eval_before=eval_records.get(0),
                     eval_after=eval_records.get(last) if last else None), f, indent=1,
                default=str)
  if workdir and config.get("save_model"):
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    from postrl.models import save_pretrained  # pylint: disable=import-outside-toplevel
    # every process takes part in gathering the shards; process 0 writes
    host_params = multihost_utils.process_allgather(result.state.params, tiled=True)
    if jax.process_index() == 0:
      save_pretrained(nnx.merge(graphdef, host_params), os.path.join(workdir, "model"))
      print(f"wrote {os.path.join(workdir, 'model')} (loads with load_pretrained or transformers)")
  return summary


def run_fingerprint(config, model_cfg) -> dict:
  """What a checkpoint must match to be resumed: the model and everything that shapes the data
  stream or the optimizer. ``steps`` may change (a run can be extended), as may logging and
  evaluation settings."""
  keys = ("param_dtype", "seed", "batch_size", "accum_steps", "seq_len")
  return json.loads(json.dumps(dict(
      model=dataclasses.asdict(model_cfg), data=config.data.to_dict(),
      optim=config.optim.to_dict(), **{k: config.get(k) for k in keys})))

