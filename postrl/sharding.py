"""Sharding declared once, by name: the mesh, logical-axis rules, and state created already sharded.

The mesh is a list of ``(axis, size)`` pairs, ``-1`` meaning "all the devices left":

    mesh = make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])

Every model parameter carries logical axis names (``("embed", "mlp")`` for an MLP up-projection,
see ``postrl.models.transformer``). ``RULES`` maps each logical name to a mesh axis (or a tuple
of mesh axes, or None = replicated); a dimension that the mesh axes do not divide stays
replicated rather than failing, and a mesh axis is used at most once per array.

    data    batch rows (pure data parallelism: parameters replicated)
    fsdp    batch rows too, and parameters + optimizer state sharded along "embed" (ZeRO-3 style)
    tensor  heads, MLP hidden and vocabulary split across devices (Megatron style)

State is never materialised on one device first: ``sharded_init`` evaluates the initialiser's
shapes with ``jax.eval_shape``, derives the shardings, and runs the initialiser under ``jit`` with
those output shardings, so each device only ever holds its shard.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axis (str), several mesh axes (tuple) or None (replicated).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
)


class ShardingError(ValueError):
  """A mesh that does not fit the devices or the rules, a logical axis without a rule, or a batch
  whose rows do not split over the mesh."""


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None, *,
              rules=RULES) -> Mesh:
  """A device mesh from ``[(name, size), ...]``; one size may be -1 (= the remaining devices).

  Axis types are set explicitly to ``Auto`` (the compiler propagates shardings from the inputs
  and the constraints we place). An axis of size > 1 that no rule of ``rules`` maps to (a typo
  such as "tensr") is an error: every array would be replicated over it, each of its devices
  doing the same work; ``rules=None`` allows any names.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ShardingError("make_mesh: no devices")
  if len(set(devices)) != len(devices):
    raise ShardingError(f"make_mesh: a device appears more than once in {devices}")
  if isinstance(axes, (str, dict)) or not all(
      isinstance(a, (tuple, list)) and len(a) == 2 for a in axes):
    raise ShardingError(f"a mesh is a list of (name, size) pairs, e.g. [('data', -1), "
                        f"('tensor', 2)], got {axes!r}")
  for name, size in axes:
    if not isinstance(name, str) or not name:
      raise ShardingError(f"mesh axis names must be non-empty strings, got {name!r} in {axes!r}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
      raise ShardingError(f"mesh axis {name!r}: the size must be an integer (-1 = the remaining "
                          f"devices), got {size!r}")
  names = [a for a, _ in axes]
  sizes = [int(s) for _, s in axes]
  if len(set(names)) != len(names):
    raise ShardingError(f"mesh axis names must be distinct, got {names}")
  if sizes.count(-1) > 1:
    raise ShardingError(f"at most one mesh axis may have size -1, got {list(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or known == 0:
    raise ShardingError(f"mesh axis sizes must be positive or -1, got {list(axes)}")
  if -1 in sizes:
    if len(devices) % known:
      raise ShardingError(f"mesh {list(axes)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ShardingError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                        f"there are {len(devices)}")
  if rules is not None:
    ruled = {a for _, value in rules for a in _mesh_axes(value)}
    unused = [f"{n!r} (size {s})" for n, s in zip(names, sizes) if s > 1 and n not in ruled]
    if unused:
      raise ShardingError(f"mesh {dict(zip(names, sizes))}: axis {', '.join(unused)} is in no "
                          f"sharding rule, so every array would be replicated over it (each of "
                          f"its devices doing the same work); the rules use {sorted(ruled)}")
  device_array = np.asarray(devices, dtype=object).reshape(sizes)
  if len(devices) == jax.device_count() and devices == list(jax.devices()):
    # jax's own ordering puts mesh neighbours on physically close devices (ICI / NVLink).
    device_array = jax.make_mesh(tuple(sizes), tuple(names),
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(sizes)).devices
  return Mesh(device_array, tuple(names),
              axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _mesh_axes(rule_value) -> tuple[str, ...]:
  if rule_value is None:
    return ()
  return (rule_value,) if isinstance(rule_value, str) else tuple(rule_value)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> P:
  """PartitionSpec for an array with logical axis ``names`` and ``shape`` on ``mesh``.

  A logical name maps to the mesh axes its rule gives, minus axes of size 1 (or absent from the
  mesh), axes already used
  by an earlier dimension, and axes the dimension is not divisible by (those dims replicate).
  """
  rule_map = dict(rules)
  if len(names) != len(shape):
    raise ShardingError(f"logical axis names {tuple(names)} do not match an array of shape "
                        f"{tuple(shape)} (one name, or None, per dimension)")
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    if name is not None and name not in rule_map:
      raise ShardingError(f"no sharding rule for logical axis {name!r}; rules: {sorted(rule_map)}")
    chosen = []
    for axis in _mesh_axes(rule_map.get(name)):
      if axis not in mesh.shape:  # a mesh without this axis behaves as if it had size 1
        continue
      size = mesh.shape[axis]
      if size == 1 or axis in used or dim % (math.prod(mesh.shape[a] for a in chosen) * size):
        continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _logical_names(variable, ndim: int):
  names = variable.get_metadata().get("out_sharding") or variable.get_metadata().get(
      "sharding_names")
  return tuple(names) if names is not None else (None,) * ndim


def state_shardings(abstract_state, mesh: Mesh, rules=RULES):
  """NamedShardings for an NNX state (arrays or ShapeDtypeStructs) from its logical axis names.

  Variables without names (and non-Variable leaves) are replicated.
  """

  def one(path, leaf):
    if _is_variable(leaf):
      value = leaf.get_value()
      try:
        spec = logical_to_spec(_logical_names(leaf, value.ndim), value.shape, mesh, rules)
      except ShardingError as e:
        raise ShardingError(f"{jax.tree_util.keystr(path)}: {e}") from None
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, rules=RULES) -> NamedSharding:
  """Rows (dimension 0) sharded over the mesh axes of the ``batch`` rule, the rest replicated.

  The spec names only dimension 0, so one sharding fits batch arrays of any rank.
  """
  axes = tuple(a for a in batch_axes(rules) if a in mesh.shape)
  return NamedSharding(mesh, P(axes if axes else None))


def batch_shards(mesh: Mesh, rules=RULES) -> int:
  """Number of ways the batch dimension is split (global batch must be a multiple of it)."""
  return math.prod(mesh.shape[a] for a in batch_axes(rules) if a in mesh.shape)


def optimizer_shardings(tx, params_shardings, abstract_opt_state, mesh: Mesh):
  """Shardings for an optax state: parameter-shaped leaves (Adam moments) follow their parameter;
  everything else (step counts, scalars) is replicated.

  Uses ``optax.tree_map_params``, which knows which parts of each transform's state mirror the
  parameters (also under ``optax.masked`` / ``multi_transform``, as PEFT uses).
  """
  replicated = NamedSharding(mesh, P())
  masked = optax.MaskedNode  # where ``optax.masked`` keeps no state for a parameter

  return optax.tree_map_params(
      tx, lambda leaf, sharding: leaf if isinstance(leaf, masked) else sharding,
      abstract_opt_state, params_shardings, transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, (NamedSharding, masked)))


def sharded_init(init_fn: Callable[[], Any], shardings_fn: Callable[[Any], Any]):
  """Runs ``init_fn`` with its outputs created directly in their shardings.

  Args:
    init_fn: builds the state (no arguments; close over keys and configs).
    shardings_fn: abstract state (ShapeDtypeStructs) -> matching tree of shardings.
  Returns:
    (state, shardings)
  """
  abstract = jax.eval_shape(init_fn)
  shardings = shardings_fn(abstract)
  return jax.jit(init_fn, out_shardings=shardings)(), shardings


def batch_axes(rules=RULES) -> tuple[str, ...]:
  """The mesh axes rows are split over (the ``batch`` rule: data, fsdp)."""
  return _mesh_axes(dict(rules).get("batch"))


def split_over_batch_axes(tree, rules=RULES) -> bool:
  """Whether any array of ``tree`` is split over a batch axis of size > 1 (fsdp-sharded
  weights)."""
  axes = set(batch_axes(rules))
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
      used = {a for e in sharding.spec for a in _mesh_axes(e)} & axes
      if any(sharding.mesh.shape[a] > 1 for a in used):
        return True
  return False


def gather_over_batch_axes(tree, rules=RULES):
  """``tree`` with every array on a NamedSharding resharded without the batch axes (data, fsdp)
  in its spec: whole on every device of those axes, still split over the others (tensor). What
  decoding wants for the weights (``postrl.sampling.generate``): one gather before the loop
  instead of an fsdp all-gather of every layer at every step. Other leaves (host arrays,
  single-device arrays) are returned as they are."""
  dropped = set(batch_axes(rules))

  def drop(entry):
    axes = tuple(a for a in _mesh_axes(entry) if a not in dropped)
    return None if not axes else axes[0] if len(axes) == 1 else axes

  leaves, treedef = jax.tree.flatten(tree)
  picked = [i for i, x in enumerate(leaves)
            if isinstance(getattr(x, "sharding", None), NamedSharding)]
  targets = [NamedSharding(leaves[i].sharding.mesh,
                           P(*(drop(e) for e in leaves[i].sharding.spec))) for i in picked]
  moved = jax.device_put([leaves[i] for i in picked], targets)
  for i, x in zip(picked, moved):
    leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


def put_global(tree, shardings):
  """Places host values (identical in every process) as global arrays with ``shardings``.

  Works in multi-process runs, where ``jax.device_put`` cannot address other hosts' devices:
  each process fills only its own shards from its copy.
  """

  def one(x, sharding):
    if isinstance(x, jax.Array):  # device arrays (global ones too) are resharded by XLA
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)


def put_batch(batch: dict, mesh: Mesh, rules=RULES) -> dict:
  """Per-process batch rows (numpy) -> global arrays with rows sharded over the batch axes.

  Each process passes its own rows (``global_batch / process_count`` of them); in a
  single-process run this is the whole batch.
  """
  sharding = batch_sharding(mesh, rules)
  shards, processes = batch_shards(mesh, rules), jax.process_count()
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.ndim == 0 or (v.shape[0] * processes) % shards:
      raise ShardingError(f"batch[{k!r}] of shape {v.shape}: its rows (dimension 0, x "
                          f"{processes} processes) must split evenly over the {shards} batch "
                          f"shards of mesh {dict(mesh.shape)}")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
