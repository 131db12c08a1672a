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

import jax.numpy as jnp

from postrl.data.pipeline import sft_batches
from postrl.data.records import ArrayRecordRecords, read_jsonl
from postrl.data.tasks import sft_records
from postrl.logprobs import model_apply_fn, token_logps
from postrl.losses import aggregate
from postrl.trainers import common
from postrl.trainers.loop import fit
from postrl.trainers.step import learning_rate_schedule, make_optimizer


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
  # never train on an evaluation problem
  return sft_records(common.held_out_train_problems(data_cfg.task, data_cfg.num_train,
                                                    data_cfg.train_seed, eval_problems))


def run(config, workdir: str | None) -> dict:
  """Fine-tunes ``config.model`` on ``config.data``; evaluates before and after."""
  # cheap checks first: the optimizer, data, then the mesh, then the (slow) model load
  optim = common.optimizer_config(config)
  records = training_records(config.data, common.eval_problems(config))
  run_ = common.start(config)
  batches = sft_batches(records, run_.tokenizer, batch_size=config.batch_size,
                        seq_len=config.seq_len, pack=config.data.pack, seed=config.seed)
  result = fit(
      sft_loss_fn(model_apply_fn(run_.graphdef), chunk=config.get("logprob_chunk"),
                  vocab_chunk=config.get("vocab_chunk")),
      run_.params, make_optimizer(optim), batches, mesh=run_.mesh, total_steps=config.steps,
      workdir=workdir, seed=config.seed, accum_steps=config.accum_steps,
      save_every=config.checkpoint.every, keep_checkpoints=config.checkpoint.keep,
      fingerprint=run_fingerprint(config, run_.model_cfg), log_every=config.log_every,
      lr_schedule=learning_rate_schedule(optim),
      flops_per_token=common.model_flops(run_.model_cfg, config.seq_len),
      eval_fn=common.task_eval_fn(run_, config) if run_.eval_problems else None,
      eval_every=config.eval.every, eval_before=config.eval.before, frozen=run_.frozen)
  return common.finish(run_, config, workdir, result, num_train_records=len(records))


def run_fingerprint(config, model_cfg) -> dict:
  """What a checkpoint must match to be resumed: the model and everything that shapes the data
  stream or the optimizer. ``steps`` may change (a run can be extended), as may logging and
  evaluation settings."""
  return common.fingerprint(config, model_cfg, "batch_size", "accum_steps", "seq_len")
