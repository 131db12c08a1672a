"""The training loop every trainer runs: sharded state, resume, checkpoints, metrics, NaN guard.

    state, history = fit(loss_fn, params, tx, batches, mesh=mesh, total_steps=..., workdir=...)

What it does, in order:

1. Places the parameters on the mesh by their logical axes and creates the optimizer state
   directly in its shardings (``postrl.sharding``).
2. If ``workdir/checkpoints`` holds a checkpoint, restores params, optimizer state, step, RNG and
   the data iterator's position from it, so the resumed run continues bit for bit (an incompatible
   checkpoint is an error, never a silent fresh start).
3. Runs the jitted, donated step (``postrl.trainers.step``); metrics of step s are fetched after
   step s+1 has been dispatched, so the host never stalls the device.
4. Stops with ``NonFiniteError`` naming the step if a loss, gradient or update is NaN/Inf (that
   update is not applied, and no checkpoint is written after it).
5. Saves every ``save_every`` steps, at the end, and when SIGTERM or Ctrl-C arrives (pod
   pre-emption): the run then exits cleanly and ``fit`` returns with ``preempted=True``.
   If the batches run out before ``total_steps``, it saves the steps done and raises ``DataError``.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from postrl import sharding as shd
from postrl.checkpoint import CheckpointError, Checkpointer, PreemptionGuard, should_stop
from postrl.data.records import DataError
from postrl.metrics import MetricsLogger, mfu, peak_flops
from postrl.models.config import ConfigError
from postrl.trainers.step import LossFn, TrainState, init_train_state, make_train_step


class NonFiniteError(FloatingPointError):
  """A NaN or Inf loss, gradient or update; names the step. The update was not applied."""


@dataclasses.dataclass
class FitResult:
  state: TrainState
  history: list[dict]
  preempted: bool = False
  resumed_from: int | None = None


def _state_shardings(tx, abstract_state: TrainState, mesh, rules) -> TrainState:
  params = shd.state_shardings(abstract_state.params, mesh, rules)
  replicated = NamedSharding(mesh, P())
  return TrainState(step=replicated, params=params,
                    opt_state=shd.optimizer_shardings(tx, params, abstract_state.opt_state, mesh),
                    rng=replicated)


def abstract_state(params, tx, *, seed: int, mesh, rules=shd.RULES):
  """(ShapeDtypeStructs with shardings, shardings) of the TrainState ``create_state`` makes."""
  key = jax.random.key(seed)
  abstract = jax.eval_shape(lambda p: init_train_state(p, tx, key), params)
  shardings = _state_shardings(tx, abstract, mesh, rules)
  structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, shardings)
  return structs, shardings


def create_state(params, tx, *, seed: int, mesh, rules=shd.RULES) -> tuple[TrainState, TrainState]:
  """(state, shardings): params placed by their logical axes, optimizer state created sharded.

  The placed parameters are donated to the initialiser, so no second copy stays alive.
  """
  key = jax.random.key(seed)
  _, shardings = abstract_state(params, tx, seed=seed, mesh=mesh, rules=rules)
  params = shd.put_global(params, shardings.params)
  init = jax.jit(lambda p: init_train_state(p, tx, key), out_shardings=shardings,
                 donate_argnums=0)
  return init(params), shardings


def _to_host(metrics: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def fit(loss_fn: LossFn, params, tx: optax.GradientTransformation, batches: Iterator[dict], *,
        mesh, total_steps: int, workdir: str | None, seed: int = 0, accum_steps: int = 1,
        save_every: int = 0, keep_checkpoints: int = 2, fingerprint: dict | None = None,
        log_every: int = 1, lr_schedule: Callable | None = None,
        flops_per_token: float | None = None, eval_fn: Callable[[Any, int], dict] | None = None,
        eval_every: int = 0, eval_before: bool = False, stop_check_every: int = 10,
        rules=shd.RULES, progress: bool = True, frozen=None) -> FitResult:
  """Trains ``params`` with ``loss_fn`` for ``total_steps`` optimizer steps; see the module doc.

  Args:
    loss_fn: ``(params, batch) -> (loss, metrics)`` (batch arrays are global, rows sharded).
    params: initial parameters (host or device arrays, an NNX state with logical axis names).
    tx: the optimizer (``make_optimizer``).
    batches: iterator of per-process numpy batch dicts; if it has ``get_state``/``set_state`` its
      position is checkpointed and restored. An on-policy source instead has
      ``next_batch(params, step)`` (called with the current, sharded params: rollouts, on-policy
      distillation) and may have ``pop_metrics()`` -> host scalars logged with that step.
    mesh: the device mesh (``postrl.sharding.make_mesh``).
    total_steps: optimizer steps to run in all (a resumed run does the remaining ones).
    workdir: metrics, TensorBoard events, loss curve and checkpoints go here (None: nothing saved).
    save_every: checkpoint period in steps (0: only at the end and on SIGTERM).
    fingerprint: JSON-able description a checkpoint must match to be resumed (model, optimizer).
    log_every: metrics written every this many steps.
    lr_schedule: step -> learning rate, logged as ``optim/lr``.
    flops_per_token: model FLOPs per trained token (for ``perf/mfu``).
    eval_fn: ``(params, step) -> metrics`` run every ``eval_every`` steps and at the end.
    eval_before: also evaluate the initial parameters, logged as step 0 (not when resuming).
    stop_check_every: on several processes, how often (steps) they agree on a SIGTERM/Ctrl-C.
    frozen: PEFT (``postrl.peft``): the frozen part of the parameters (host arrays); ``params``
      is then only the trainable part, the only one differentiated, given optimizer state and
      checkpointed. ``frozen`` is placed by its logical axes and passed to the jitted step as a
      separate, non-donated argument; its digest joins the fingerprint (a checkpoint resumes only
      on the same base). ``loss_fn``, ``eval_fn`` and ``next_batch`` get the full parameters
      (``postrl.peft.combine``).
  """
  if not (isinstance(total_steps, numbers.Integral) and total_steps >= 1):
    raise ConfigError(f"total_steps (config.steps) must be an integer >= 1, got {total_steps!r}")
  is_main = jax.process_index() == 0
  combine, frozen_shardings = None, None
  if frozen is not None:
    from postrl import peft  # pylint: disable=import-outside-toplevel
    combine = peft.combine
    if fingerprint is not None:
      fingerprint = dict(fingerprint, frozen_base=peft.base_digest(frozen))
    frozen_shardings = shd.state_shardings(frozen, mesh, rules)
    frozen = shd.put_global(frozen, frozen_shardings)
  full = (lambda p: p) if frozen is None else (lambda p: combine(p, frozen))
  structs, shardings = abstract_state(params, tx, seed=seed, mesh=mesh, rules=rules)
  ckpt = None
  start_step, resumed_from = 0, None
  latest = None
  if workdir:
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=save_every or total_steps,
                        keep=keep_checkpoints, fingerprint=fingerprint)
    latest = ckpt.latest_step()
  if latest is not None:  # restored straight into its shardings; no fresh state is built first
    state, extra = ckpt.restore(latest, structs)
    start_step = resumed_from = int(jax.device_get(state.step))
    if start_step != latest:
      raise CheckpointError(f"{ckpt.directory} step {latest} holds a state at step {start_step}")
    if extra.get("data") is not None and hasattr(batches, "set_state"):
      batches.set_state(extra["data"])
    if is_main:
      print(f"resumed from {ckpt.directory} step {start_step}")
  else:
    state, shardings = create_state(params, tx, seed=seed, mesh=mesh, rules=rules)
  del params
  divisor = shd.batch_shards(mesh, rules) * accum_steps

  step_fn = make_train_step(loss_fn, tx, state_shardings=shardings,
                            batch_sharding=shd.batch_sharding(mesh, rules), accum_steps=accum_steps,
                            mesh=mesh, combine=combine, frozen_shardings=frozen_shardings)
  frozen_args = () if frozen is None else (frozen,)
  peak = peak_flops(jax.devices()[0])
  logger = MetricsLogger(workdir, total_steps=total_steps, enabled=is_main, start_step=start_step,
                         progress=progress and is_main)
  history: list[dict] = []
  pending = None  # (step, device metrics, host extras) of the previous step
  last_saved = start_step if resumed_from is not None else None
  preempted = exhausted = False

  def data_state():
    return batches.get_state() if hasattr(batches, "get_state") else None

  def finish(pending_item):
    """Fetches one step's metrics, checks them, logs them."""
    step, dev_metrics, extras = pending_item
    m = _to_host(dev_metrics)
    if m.get("step/finite", 1.0) != 1.0:
      where = f"; last checkpoint: step {last_saved}" if last_saved is not None else ""
      loss, grad_norm = m.get("loss"), m.get("optim/grad_norm")
      if np.isfinite(loss) and np.isfinite(grad_norm):  # the optimizer made the NaN
        raise NonFiniteError(
            f"step {step}: non-finite optimizer update from a finite loss ({loss}) and gradient "
            f"(grad_norm={grad_norm}). The update was not applied and no checkpoint was written "
            f"after it{where}. Check the optimizer's settings (learning rate, eps).")
      raise NonFiniteError(
          f"step {step}: non-finite loss or gradient (loss={loss}, grad_norm={grad_norm}). The "
          f"update was not applied and no checkpoint was written after it{where}. Lower the "
          f"learning rate, check the data of this step, or use float32 params.")
    # Steps run back to back on the device and step s's metrics are ready when it ends, so the
    # time between two fetches is one step (the first one includes compilation).
    now = time.perf_counter()
    seconds = now - clock["last"]
    clock["last"] = now
    m.update(extras)
    m["perf/step_seconds"] = seconds
    m["perf/tokens_per_second"] = extras["perf/tokens"] / max(seconds, 1e-9)
    if lr_schedule is not None:
      m["optim/lr"] = float(lr_schedule(step - 1))
    if flops_per_token:  # achieved model FLOP/s; MFU where the device's peak is known
      m["perf/model_tflops"] = m["perf/tokens_per_second"] * flops_per_token / 1e12
      if peak:
        m["perf/mfu"] = mfu(m["perf/tokens_per_second"], flops_per_token, peak,
                            num_devices=jax.device_count())
    history.append(dict(m, step=step))
    if step % log_every == 0 or step == total_steps:
      logger.write(step, m)
    return m

  def evaluate(step):
    result = {f"eval/{k}": v for k, v in eval_fn(full(state.params), step).items()}
    logger.write(step, result)
    history.append(dict(result, step=step))

  if eval_fn is not None and eval_before and resumed_from is None:
    evaluate(0)
  clock = {"last": time.perf_counter()}
  step = start_step
  try:
    with PreemptionGuard(sigint=True) as guard:
      while step < total_steps:
        # an on-policy source (RL rollouts, on-policy distillation) samples with the current params
        try:
          host_batch = (batches.next_batch(full(state.params), step)
                        if hasattr(batches, "next_batch") else next(batches))
        except StopIteration:
          exhausted = True
          break
        source_metrics = batches.pop_metrics() if hasattr(batches, "pop_metrics") else {}
        rows = len(next(iter(host_batch.values()))) * jax.process_count()
        if rows % divisor:
          raise shd.ShardingError(
              f"the global batch has {rows} rows, which the {shd.batch_shards(mesh, rules)} "
              f"batch shards of mesh {dict(mesh.shape)} x accum_steps={accum_steps} do not divide")
        tokens = (int(np.sum(np.asarray(host_batch["segment_ids"]) > 0))
                  if "segment_ids" in host_batch else int(np.size(next(iter(host_batch.values())))))
        batch = shd.put_batch(host_batch, mesh, rules)
        state, dev_metrics = step_fn(state, batch, *frozen_args)
        step += 1
        if pending is not None:
          finish(pending)
        pending = (step, dev_metrics, {"perf/tokens": tokens * jax.process_count(),
                                       **source_metrics})
        save_now = ckpt is not None and (ckpt.should_save(step) or step == total_steps)
        # agreeing on a stop is a collective on several processes: not every step there
        stop = (jax.process_count() == 1 or step % stop_check_every == 0) and should_stop(guard)
        eval_now = bool(eval_fn is not None and eval_every and step % eval_every == 0
                        and step != total_steps)
        if save_now or stop or eval_now:
          finish(pending)  # a checkpoint or eval only ever sees a step whose metrics passed
          pending = None
        if save_now or (stop and ckpt is not None):
          ckpt.save(step, state, {"data": data_state()}, force=True)
          last_saved = step
        if eval_now:
          evaluate(step)
        if save_now or stop or eval_now:
          clock["last"] = time.perf_counter()  # saving / evaluating is not training time
        if stop:
          preempted = True
          if is_main:
            print(f"stop signal: saved step {step}; run the same command again to resume")
          break
      if pending is not None:
        finish(pending)
      if exhausted:  # keep the steps done so far, then say so
        if ckpt is not None and step > start_step and step != last_saved:
          ckpt.save(step, state, {"data": data_state()}, force=True)
          last_saved = step
        where = f"; last checkpoint: step {last_saved}" if last_saved is not None else ""
        raise DataError(f"the batches ran out at step {step + 1} of total_steps={total_steps}"
                        f"{where}. The data holds fewer batches than the run needs: repeat it "
                        f"(more epochs) or train for fewer steps.")
      if ckpt is not None:
        ckpt.wait()  # the final checkpoint is complete before the (long) final evaluation
      if eval_fn is not None and not preempted:
        evaluate(step)
  finally:  # checkpoints already started are completed even when a step failed
    if ckpt is not None:
      ckpt.wait()
      ckpt.close()
    logger.close()
  return FitResult(state=state, history=history, preempted=preempted, resumed_from=resumed_from)
