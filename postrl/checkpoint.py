"""Checkpoints for exact resume: a thin wrapper over orbax's ``CheckpointManager``.

Each step directory holds three orbax items::

  <directory>/<step>/state        the pytree of arrays (params, optimizer state, PRNG key data, ...)
  <directory>/<step>/extra        JSON: data-iterator position, config, anything the trainer needs
  <directory>/<step>/fingerprint  JSON: what the state must match (model config, optimizer name)

Writes are asynchronous and atomic: orbax copies the arrays to host memory before ``save`` returns,
writes ``<step>.orbax-checkpoint-tmp`` in a background thread, and renames it to ``<step>`` only
when every file is written, so a crash mid-write leaves no directory that ``latest_step`` picks.
Left-over tmp directories are deleted when the next ``Checkpointer`` opens the directory.

``restore`` checks the fingerprint and every path, shape and dtype against the run's abstract state
before reading any array, and restores each array directly onto the sharding its
``jax.ShapeDtypeStruct`` asks for. All processes of a multi-host run call ``save`` and ``restore``;
orbax decides who writes what.

Typical trainer loop::

  ckpt = Checkpointer(f"{workdir}/checkpoints", save_every=200, fingerprint=cfg.to_dict())
  if (step := ckpt.latest_step()) is not None:
    state, extra = ckpt.restore(step, abstract_state)
  with PreemptionGuard() as guard:
    while step < total_steps:
      state, metrics = train_step(state, batch); step += 1
      stop = should_stop(guard)
      ckpt.save(step, state, {"data": it.get_state()}, force=stop or step == total_steps)
      if stop:
        break
  ckpt.close()
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "PreemptionGuard", "should_stop"]

_ITEMS = ("state", "extra", "fingerprint")
_ADVICE = "Use a new workdir, or the config this checkpoint was written with."


class CheckpointError(ValueError):
  """A checkpoint is missing, damaged or does not match the state of this run, or the checkpoint
  settings (directory, ``save_every``, ``keep``) cannot work."""


def _path_str(keypath) -> str:
  """``params/layers/0/kernel``: the path as orbax names it (dict key, attribute name, index)."""
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _flat(tree) -> dict[str, Any]:
  return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_prng_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _check_no_prng_keys(tree, what: str):
  for path, x in _flat(tree).items():
    if _is_prng_key(x):
      raise TypeError(f"{what} {path} is a typed PRNG key: store jax.random.key_data(key) "
                      "instead and rebuild it with jax.random.wrap_key_data after restoring.")


def _flat_json(d, prefix="") -> dict[str, Any]:
  """Nested dict -> {"a.b": leaf}; non-dict values are leaves."""
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat_json(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _fingerprint_diff(stored: dict, current: dict) -> str | None:
  """The first key where two fingerprints differ, as "'key': stored vs current", or None."""
  a, b = _flat_json(stored), _flat_json(current)
  for key in list(b) + [k for k in a if k not in b]:
    if key not in a:
      return f"'{key}': absent vs {b[key]!r}"
    if key not in b:
      return f"'{key}': {a[key]!r} vs absent"
    if a[key] != b[key]:
      return f"'{key}': {a[key]!r} vs {b[key]!r}"
  return None


def _abstract(path: str, x) -> jax.ShapeDtypeStruct:
  """A ``ShapeDtypeStruct`` with a sharding, from a struct or an array."""
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    if jax.process_count() > 1:
      raise ValueError(f"abstract_state {path} has no sharding; multi-process restore needs one "
                       "(jax.ShapeDtypeStruct(shape, dtype, sharding=...)).")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class Checkpointer:
  """Saves every ``save_every`` steps, keeps the newest ``keep``, restores with checks.

  Args:
    directory: where step directories go (local path or a ``gs://`` URL).
    save_every: ``should_save(step)`` is ``step % save_every == 0``.
    keep: number of newest checkpoints kept (``None`` keeps all).
    fingerprint: JSON-able dict the restored state must match (model config, optimizer name, ...);
      stored with every checkpoint and compared by ``restore``. ``None`` skips the comparison.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int | None = 3,
               fingerprint: dict | None = None):
    if save_every < 1:
      raise CheckpointError(f"save_every must be >= 1, got {save_every}")
    if keep is not None and keep < 1:
      raise CheckpointError(f"keep must be >= 1 or None, got {keep}")
    directory = os.fspath(directory)
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    if "://" not in directory:  # a file in the way fails here, not deep inside orbax
      try:
        os.makedirs(self.directory, exist_ok=True)
      except OSError as e:
        raise CheckpointError(f"{self.directory}: cannot create the checkpoint directory "
                              f"({e.strerror or e}). Use another workdir.") from None
    self.save_every = save_every
    # The JSON round trip makes tuples lists, as they come back from disk.
    self.fingerprint = None if fingerprint is None else json.loads(json.dumps(fingerprint))
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.handlers.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.handlers.StandardCheckpointHandler)
    for name in ("extra", "fingerprint"):
      registry.add(name, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
      registry.add(name, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)

  def all_steps(self) -> list[int]:
    """Steps saved (or being saved by this process), oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None. A save still in flight in this process counts."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state, extra: dict, *, force: bool = False) -> bool:
    """Starts saving ``state`` and ``extra`` at ``step`` if ``should_save(step)`` or ``force``.

    Returns once the arrays are copied to host memory (``state`` may then be donated or deleted);
    the files are written in the background (``wait`` blocks until they are). A step that is
    already saved is not written again. Returns whether a save started.

    Args:
      state: pytree of jax arrays, possibly sharded; PRNG keys as raw ``jax.random.key_data``.
      extra: JSON-able dict (data-iterator position, config, ...).
    """
    if not (force or self.should_save(step)):
      return False
    if step in self._manager.all_steps():
      logging.info("step %d is already saved in %s; not saving again", step, self.directory)
      return False
    _check_no_prng_keys(state, "state")
    try:
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise TypeError(f"extra must be JSON-able: {e}") from e
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        extra=ocp.args.JsonSave(extra),
        fingerprint=ocp.args.JsonSave(self.fingerprint or {}))
    return bool(self._manager.save(step, args=args, force=True))

  def restore(self, step: int | None, abstract_state) -> tuple[Any, dict]:
    """Returns ``(state, extra)`` saved at ``step`` (the latest if None), checked against this run.

    Args:
      step: the step to restore, or None for the latest.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set (e.g.
        ``jax.eval_shape`` of the init plus its shardings), or of arrays; each array is read
        directly onto that sharding. On a single process a missing sharding means device 0.

    Raises:
      CheckpointError: no checkpoint, or the stored fingerprint, tree paths, shapes or dtypes
        differ from this run's; the message names the directory, the step and the first mismatch.
    """
    self.wait()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"{self.directory}: no checkpoint to restore.")
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(
          f"{self.directory}: no checkpoint at step {step} (saved steps: {steps}).")
    where = f"{self.directory} step {step}"
    if self.fingerprint is not None:
      stored = self._read(where, step, lambda: self._manager.restore(
          step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))["fingerprint"])
      diff = _fingerprint_diff(stored or {}, self.fingerprint)
      if diff is not None:
        raise CheckpointError(
            f"{where}: fingerprint differs at {diff} (checkpoint vs this run). {_ADVICE}")
    _check_no_prng_keys(abstract_state, "abstract_state")
    abstract_state = jax.tree_util.tree_map_with_path(
        lambda p, x: _abstract(_path_str(p), x), abstract_state)
    self._check_tree(where, step, abstract_state)
    restored = self._read(where, step, lambda: self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore())))
    return restored["state"], restored["extra"]

  def _read(self, where: str, step: int, read: Callable[[], Any]):
    """``read()``, its failure a ``CheckpointError`` naming the step: a damaged checkpoint (a file
    missing, truncated or not parseable) fails in orbax, TensorStore or json, each with its own
    kind of error and a long trace."""
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-exception-caught
      detail = (str(e).strip().splitlines() or [""])[0][:300]
      raise CheckpointError(
          f"{where} cannot be read ({type(e).__name__}: {detail}). If it is damaged (a file "
          f"missing or truncated), delete {self.directory}/{step} to resume from an earlier "
          f"checkpoint (saved steps: {self.all_steps()}), or use a new workdir.") from e

  def _check_tree(self, where: str, step: int, abstract_state):
    metadata = self._read(where, step, lambda: self._manager.item_metadata(step)["state"])
    stored = _flat(getattr(metadata, "tree", metadata))
    wanted = _flat(abstract_state)
    problem = None
    for path, want in wanted.items():
      have = stored.get(path)
      if have is None:
        problem = f"{path} is in this run but not in the checkpoint"
      elif tuple(have.shape) != tuple(want.shape):
        problem = (f"{path} has shape {tuple(have.shape)} in the checkpoint but "
                   f"{tuple(want.shape)} in this run")
      elif np.dtype(have.dtype) != np.dtype(want.dtype):
        problem = (f"{path} has dtype {np.dtype(have.dtype)} in the checkpoint but "
                   f"{np.dtype(want.dtype)} in this run")
      if problem:
        break
    else:
      extra = [p for p in stored if p not in wanted]
      if extra:
        problem = f"{extra[0]} is in the checkpoint but not in this run"
    if problem:
      raise CheckpointError(f"{where}: {problem}. {_ADVICE}")

  def wait(self):
    """Blocks until every started save is written and renamed into place (and old ones pruned)."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves, then releases orbax's threads. Call once at the end of training."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class PreemptionGuard:
  """Turns SIGTERM (and SIGINT if ``sigint``) into a flag, so the trainer can save and exit.

  Inside the ``with`` block the first such signal sets ``requested`` (and ``signal``, its number)
  instead of killing the process; a second one goes to the previous handler, so a second Ctrl-C
  still interrupts. The previous handlers are restored on exit. Outside the main thread signals
  cannot be caught: the guard then only warns and ``requested`` stays False.
  """

  def __init__(self, *, sigint: bool = False):
    self.signals = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
    self.requested = False
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    if not self.requested:
      self.requested, self.signal = True, signum
      logging.warning("received %s: will save a checkpoint and stop after this step",
                      signal.Signals(signum).name)
      return
    previous = self._previous.get(signum, signal.SIG_DFL)
    if callable(previous):
      previous(signum, frame)
    elif previous == signal.SIG_DFL:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard outside the main thread: signals will not be caught")
      return self
    for s in self.signals:
      self._previous[s] = signal.getsignal(s)
      signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()


def should_stop(guard: PreemptionGuard) -> bool:
  """Whether any process got a stop signal; all processes agree, so all save and stop together.

  On several processes this is a collective (an all-gather of one flag): every process must call
  it at the same steps. On one process it is just ``guard.requested``.
  """
  if jax.process_count() == 1:
    return bool(guard.requested)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  flags = multihost_utils.process_allgather(np.asarray(guard.requested, np.int32))
  return bool(np.any(flags))
