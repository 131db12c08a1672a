"""Weight-space model merging: pure functions over parameter pytrees.

Every function takes pytrees of arrays with the same structure and shapes (plain dicts, or the
``nnx.State`` of ``graphdef, state = nnx.split(model)``) and returns a pytree of the first tree's
structure; ``nnx.merge(graphdef, merged)`` turns it back into a model. A mismatch is a
``MergeError`` naming the tree and the first mismatching path (``layers/0/mlp/up_proj/kernel``).

The arithmetic runs in float32 (or wider) and each result is cast back to the dtype of the
corresponding leaf of the first tree (``base`` where there is one). Leaves that are not floating
point (integer counters, PRNG keys) are not merged: they are copied from the first tree, and must
be equal in every tree unless they are scalars or keys (quantized codes cannot be averaged:
dequantize first). A NaN / inf weight in any model is a ``MergeError`` naming the model and path.

  linear / soup      θ = Σ_i w_i θ_i / Σ_i w_i                          Wortsman et al. 2022
  greedy_soup        add ingredients in order of held-out score while it does not drop  (same)
  task_arithmetic    θ = θ_0 + Σ_t λ_t τ_t,  τ_t = θ_t - θ_0           Ilharco et al. 2023
  ties               trim -> elect sign -> disjoint mean, θ = θ_0 + λ τ_m  Yadav et al. 2023
  dare               τ̂ = (1 - m) ⊙ τ / (1 - p),  m ~ Bernoulli(p)      Yu et al. 2024
  slerp              spherical interpolation per tensor (mergekit), lerp when nearly colinear

DARE is also an option of ``task_arithmetic`` and ``ties`` (``dare_p=``, ``key=``): each task
vector is dropped and rescaled first, then merged (Yu et al. 2024, Sec. 4.1: "DARE + Task
Arithmetic", "DARE + TIES"); ``ties(..., density=1.0, dare_p=p)`` is mergekit's ``dare_ties``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class MergeError(ValueError):
  """Trees that cannot be merged, or a bad merge hyper-parameter (the message says which)."""


# ------------------------------------------------------------------------------------ pytrees


def path_str(path: tuple) -> str:
  """A key path as ``layers/0/mlp/up_proj/kernel`` (a Variable's trailing ``.value`` dropped)."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      names.append(str(k.key))
    else:
      names.append(str(k))
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return "/".join(names) or "<root>"


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _check_values(paths, all_leaves, names):
  """Refuses leaves that no merge can use (skipped inside ``jit``, where values are abstract):

  - a NaN / inf weight (a diverged model): the mean and SLERP would turn it into NaN weights, and
    the TIES trim would drop it silently (NaN >= threshold is False), hiding the broken model;
  - integer / bool arrays that differ between the trees (quantized codes ``w_q``): they cannot
    be averaged and copying the first tree's codes under the merged float scales is a wrong
    model. Equal ones (a shared quantized base), scalars (step counters) and PRNG keys pass.
  """
  leaves = [x for xs in all_leaves for x in xs]
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    return
  for j, path in enumerate(paths):
    xs = [xs_[j] for xs_ in all_leaves]
    if _is_float(xs[0]):
      finite = jax.device_get([jnp.all(jnp.isfinite(jnp.asarray(x))) for x in xs])
      for name, ok in zip(names, finite):
        if not ok:
          raise MergeError(f"{name} has a non-finite (NaN / inf) value in {path!r}: a diverged "
                           "model cannot be merged")
    elif np.ndim(xs[0]) > 0 and not jnp.issubdtype(jnp.asarray(xs[0]).dtype,
                                                   jax.dtypes.prng_key):
      for name, x in zip(names[1:], xs[1:]):
        if not np.array_equal(np.asarray(jax.device_get(xs[0])), np.asarray(jax.device_get(x))):
          raise MergeError(f"{path!r} is {jnp.asarray(xs[0]).dtype} (not floating point) and "
                           f"differs between {names[0]} and {name}: integer leaves such as "
                           "quantized codes cannot be averaged (dequantize the models first, "
                           "postrl.quant.dequantize_model)")


def _flatten(trees: Sequence[PyTree], names: Sequence[str], *, check_values: bool = True):
  """Checks that all trees share structure and leaf shapes (and, with ``check_values``, usable
  values: ``_check_values``) -> (treedef, paths, leaves per tree)."""
  if not trees:
    raise MergeError("nothing to merge: no trees given")
  ref, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
  ref_keys = [jax.tree_util.keystr(p) for p, _ in ref]
  paths = [path_str(p) for p, _ in ref]
  all_leaves = [[x for _, x in ref]]
  for name, tree in zip(names[1:], trees[1:]):
    flat, other_def = jax.tree_util.tree_flatten_with_path(tree)
    keys = [jax.tree_util.keystr(p) for p, _ in flat]
    if keys != ref_keys or other_def != treedef:
      key_set, ref_set = set(keys), set(ref_keys)
      missing = [paths[i] for i, k in enumerate(ref_keys) if k not in key_set]
      extra = [path_str(p) for (p, _), k in zip(flat, keys) if k not in ref_set]
      if missing:
        raise MergeError(f"{name} has no leaf {missing[0]!r} (present in {names[0]}): "
                         "the trees to merge must have the same structure")
      if extra:
        raise MergeError(f"{name} has a leaf {extra[0]!r} that {names[0]} lacks: "
                         "the trees to merge must have the same structure")
      raise MergeError(f"{name} and {names[0]} have the same leaves but different containers "
                       f"({type(tree).__name__} vs {type(trees[0]).__name__})")
    leaves = [x for _, x in flat]
    for path, a, b in zip(paths, all_leaves[0], leaves):
      if _shape(a) != _shape(b):
        raise MergeError(f"{path!r}: shape {_shape(b)} in {name} but {_shape(a)} in {names[0]}")
    all_leaves.append(leaves)
  if check_values:
    _check_values(paths, all_leaves, names)
  return treedef, paths, all_leaves


def _is_float(x) -> bool:
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  return jnp.issubdtype(dtype, jnp.floating)


def _compute_dtype(x):
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _leafwise(fn: Callable, trees: Sequence[PyTree], names: Sequence[str], *,
              check_values: bool = True) -> PyTree:
  """``fn(index, path, [x_0, x_1, ...]) -> merged leaf`` over the floating leaves (as float32+);
  the result is cast to the first tree's leaf dtype; other leaves are the first tree's."""
  treedef, paths, all_leaves = _flatten(trees, names, check_values=check_values)
  out = []
  for j, path in enumerate(paths):
    xs = [leaves[j] for leaves in all_leaves]
    if not _is_float(xs[0]):
      out.append(xs[0])
      continue
    dtype = _compute_dtype(xs[0])
    merged = fn(j, path, [jnp.asarray(x, dtype) for x in xs])
    out.append(merged.astype(jnp.asarray(xs[0]).dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _names(prefix: str, n: int) -> list[str]:
  return [f"{prefix}[{i}]" for i in range(n)]


def _finite(value, what: str) -> float:
  """``value`` as a finite float (a NaN / inf coefficient would make every merged weight NaN)."""
  try:
    if isinstance(value, (str, bytes)):
      raise TypeError
    x = float(value)
  except (TypeError, ValueError):
    raise MergeError(f"{what} must be a number, got {value!r}") from None
  if not np.isfinite(x):
    raise MergeError(f"{what} must be finite, got {x}")
  return x


def _per_task(value, n: int, what: str) -> list[float]:
  """A scalar (same for every task) or one value per task, each finite."""
  if isinstance(value, str) or np.ndim(value) == 0:
    return [_finite(value, what)] * n
  if np.ndim(value) != 1:
    raise MergeError(f"{what}: expected a number or one number per model, got shape "
                     f"{np.shape(value)}")
  values = [_finite(v, f"{what}[{i}]") for i, v in enumerate(value)]
  if len(values) != n:
    raise MergeError(f"{what}: expected one value per model ({n}), got {len(values)}")
  return values


def _tree_list(trees, what: str) -> list:
  """``trees`` as a list of pytrees; one tree (a dict / ``nnx.State``) passed in its place would
  otherwise be iterated over its keys and "merged" into a key name."""
  if isinstance(trees, Mapping) or not isinstance(trees, Iterable):
    raise MergeError(f"{what} must be a list of parameter trees, got one "
                     f"{type(trees).__name__} (wrap a single tree in a list)")
  return list(trees)


def _check_key(key, who: str):
  """A JAX PRNG key (``jax.random.key(seed)`` or a legacy uint32 [2] ``PRNGKey``)."""
  ok = isinstance(key, jax.Array) and (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
      or key.dtype == jnp.uint32 and key.shape == (2,))
  if not ok:
    raise MergeError(f"{who} needs a PRNG key (key=jax.random.key(seed)), got "
                     f"{type(key).__name__} {getattr(key, 'dtype', '')}"
                     f"{list(np.shape(key)) if hasattr(key, 'shape') else ''}".rstrip())


# -------------------------------------------------------------------------------- model soups


def linear(trees: Sequence[PyTree], *, weights: Sequence[float] | None = None,
           normalize: bool = True) -> PyTree:
  """Weighted average of models: the model soup (Wortsman et al. 2022, "Model soups").

      θ = Σ_i w_i θ_i / Σ_i w_i      (normalize=True; the survey's Eq. 35, α_i = w_i / Σ w)
      θ = Σ_i w_i θ_i                (normalize=False: the weights are used as given)

  With ``weights=None`` every weight is 1: the uniform soup, the plain mean of the models.

  Args:
    trees: N >= 1 parameter pytrees of the same structure (fine-tuned from one initialisation,
      or the average is meaningless).
    weights: N weights (default uniform).
    normalize: divide by Σ_i w_i (which must then be nonzero).
  """
  trees = _tree_list(trees, "trees")
  if not trees:
    raise MergeError("nothing to merge: no trees given")
  w = _per_task(1.0 if weights is None else weights, len(trees), "weights")
  if normalize:
    total = sum(w)
    if total == 0:
      raise MergeError(f"weights {w} sum to zero: cannot normalise (pass normalize=False)")
    w = [wi / total for wi in w]
  return _leafwise(lambda j, path, xs: sum(wi * x for wi, x in zip(w, xs)), trees,
                   _names("trees", len(trees)))


soup = linear


def greedy_soup(trees: Sequence[PyTree], score_fn: Callable[[PyTree], float], *,
                higher_is_better: bool = True) -> tuple[PyTree, list[int]]:
  """The greedy soup (Wortsman et al. 2022, Recipe 1).

  Sorts the ingredients by their own held-out score (best first), starts the soup with the best
  and adds each next ingredient if the uniform soup with it scores at least as well as without:
      soup ← soup ∪ {θ_i}  if  score(mean(soup ∪ {θ_i})) >= score(mean(soup)).

  Args:
    trees: the candidate models (same structure).
    score_fn: held-out score of a parameter pytree (e.g. minus the validation perplexity).
    higher_is_better: False for a loss.
  Returns:
    (the soup, the indices of ``trees`` it averages, in the order they were added).
  """
  trees = _tree_list(trees, "trees")
  _flatten(trees, _names("trees", len(trees)))
  sign = 1.0 if higher_is_better else -1.0
  # a NaN score would sort arbitrarily and compare False: the soup would silently stop growing
  scores = [sign * _finite(score_fn(t), f"score_fn(trees[{i}])") for i, t in enumerate(trees)]
  order = sorted(range(len(trees)), key=lambda i: -scores[i])
  chosen, best = [order[0]], scores[order[0]]
  for i in order[1:]:
    score = sign * _finite(score_fn(linear([trees[k] for k in chosen + [i]])),
                           f"score_fn(soup of trees {chosen + [i]})")
    if score >= best:
      chosen.append(i)
      best = score
  return linear([trees[k] for k in chosen]), chosen


# --------------------------------------------------------------------------- task vectors


def task_vectors(base: PyTree, models: Sequence[PyTree]) -> list[PyTree]:
  """τ_t = θ_t - θ_0 for each fine-tuned model (Ilharco et al. 2023), in float32 or wider."""
  models = _tree_list(models, "models")
  if not models:
    raise MergeError("nothing to merge: no fine-tuned models given (models=[])")
  names = ["base"] + _names("models", len(models))
  _flatten([base] + models, names)

  def delta(model):
    return jax.tree.map(lambda b, m: (jnp.asarray(m, _compute_dtype(m)) - b) if _is_float(b)
                        else b, base, model)

  return [delta(m) for m in models]


def dare(delta: PyTree, *, p: float, key) -> PyTree:
  """Drop And REscale (Yu et al. 2024, "Language Models are Super Mario"), for one delta pytree.

      m ~ Bernoulli(p) per entry,   τ̂ = (1 - m) ⊙ τ / (1 - p)

  so E[τ̂] = τ and Var[τ̂] = τ² p / (1 - p) entry-wise. ``p = 0`` returns ``delta`` unchanged.

  Args:
    delta: a task vector τ (any pytree of arrays; non-float leaves pass through).
    p: drop probability in [0, 1).
    key: a JAX PRNG key; leaf j uses ``fold_in(key, j)``.
  """
  p = float(p)
  if not 0.0 <= p < 1.0:
    raise MergeError(f"dare: drop probability p must be in [0, 1), got {p}")
  if p == 0.0:
    return delta
  if key is None:
    raise MergeError("dare: p > 0 needs a PRNG key (key=jax.random.key(seed))")
  _check_key(key, "dare")
  leaves, treedef = jax.tree_util.tree_flatten(delta)
  out = []
  for j, x in enumerate(leaves):
    if not _is_float(x):
      out.append(x)
      continue
    out.append(_dare_leaf(jnp.asarray(x), jax.random.fold_in(key, j), p))
  return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit
def _dare_leaf(x, key, p):
  keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
  return jnp.where(keep, x.astype(_compute_dtype(x)) / (1.0 - p), 0).astype(x.dtype)


def _dare_all(taus: list[PyTree], dare_p: float, key) -> list[PyTree]:
  if not 0.0 <= float(dare_p) < 1.0:
    raise MergeError(f"dare_p must be in [0, 1), got {dare_p}")
  if dare_p == 0:
    return taus
  if key is None:
    raise MergeError("dare_p > 0 needs a PRNG key (key=jax.random.key(seed))")
  _check_key(key, "dare_p > 0")
  return [dare(tau, p=dare_p, key=jax.random.fold_in(key, t)) for t, tau in enumerate(taus)]


def _merge_deltas(base: PyTree, taus: list[PyTree], fn: Callable, names: list[str]) -> PyTree:
  """θ_0 + fn(index, path, [τ_1, ..., τ_T]) leaf by leaf, in the base's dtypes (the values were
  checked by ``task_vectors``)."""
  return _leafwise(lambda j, path, xs: xs[0] + fn(j, path, xs[1:]), [base] + taus, names,
                   check_values=False)


def task_arithmetic(base: PyTree, models: Sequence[PyTree], *, lam: float | Sequence[float] = 1.0,
                    dare_p: float = 0.0, key=None) -> PyTree:
  """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"; survey Eq. 38).

      θ = θ_0 + Σ_t λ_t τ_t,   τ_t = θ_t - θ_0

  λ is the paper's scaling coefficient (chosen on held-out data; λ = 1 with one model returns
  that model, λ = 1/T is the uniform soup of the T models). A negative λ_t subtracts a task
  (forgetting). With ``dare_p > 0`` each τ_t first goes through ``dare`` (DARE + Task Arithmetic).

  Args:
    base: θ_0, the pre-trained model.
    models: T fine-tuned models of the same structure.
    lam: λ for every task, or one λ_t per task.
    dare_p: DARE drop probability (0: no dropping).
    key: PRNG key for DARE (model t uses ``fold_in(key, t)``).
  """
  models = _tree_list(models, "models")
  lams = _per_task(lam, len(models), "lam")
  taus = _dare_all(task_vectors(base, models), dare_p, key)
  return _merge_deltas(base, taus, lambda j, path, ts: sum(l * t for l, t in zip(lams, ts)),
                       ["base"] + _names("models", len(models)))


def trim_top_k(x, density: float):
  """Keeps the ``max(1, round(density * size))`` entries of largest magnitude of one tensor,
  zeroes the rest (TIES step 1, per tensor); entries tied with the smallest kept magnitude are
  kept too. ``density=0`` zeroes everything.

  At least one entry is kept for any ``density > 0``: with k = round(density * size) alone, every
  tensor with fewer than about 1 / (2 density) entries (a 1- or 2-element bias or norm scale at
  the paper's 0.2) lost its whole task vector, silently merging to the base value there, while
  the paper's global ranking over the flattened model can keep a tiny tensor's large entries.
  """
  n = x.size
  k = 0 if density <= 0 else max(1, int(round(density * n)))
  if k >= n:
    return x
  if k <= 0:
    return jnp.zeros_like(x)
  mag = jnp.abs(x)
  threshold = jnp.sort(mag.ravel())[n - k]
  return jnp.where(mag >= threshold, x, 0)


def ties_merge_deltas(taus_T):
  """TIES steps 2 and 3 over stacked (already trimmed) task vectors of one tensor.

      γ = sgn(Σ_t τ̂_t)                      (elect: the sign of the larger total mass)
      A = {t : sgn(τ̂_t) = γ, τ̂_t ≠ 0}       (per entry)
      τ_m = Σ_{t∈A} τ̂_t / |A|                (disjoint mean; 0 where A is empty, e.g. γ = 0)

  Args:
    taus_T: [T, ...] trimmed task vectors of one tensor.
  """
  sign = jnp.sign(taus_T.sum(axis=0))
  agree = (jnp.sign(taus_T) == sign[None]) & (taus_T != 0)
  count = agree.sum(axis=0)
  return jnp.where(agree, taus_T, 0).sum(axis=0) / jnp.maximum(count, 1).astype(taus_T.dtype)


@functools.partial(jax.jit, static_argnames=("density",))
def _ties_leaf(taus, *, density):
  return ties_merge_deltas(jnp.stack([trim_top_k(t, density) for t in taus]))


def ties(base: PyTree, models: Sequence[PyTree], *, density: float = 0.2, lam: float = 1.0,
         dare_p: float = 0.0, key=None) -> PyTree:
  """TIES-Merging (Yadav et al. 2023, "Resolving interference when merging models").

      1. trim:   τ̂_t = keep the top ``density`` fraction of |τ_t| of each tensor (at least one
                 entry when density > 0; ``trim_top_k``), zero the rest
      2. elect:  γ = sgn(Σ_t τ̂_t)
      3. merge:  τ_m = mean of the τ̂_t that agree in sign with γ (disjoint mean, per entry)
      θ = θ_0 + λ τ_m

  The paper keeps k = 20% (``density=0.2``) of each task vector; trimming here is per tensor
  (as mergekit does; the paper's code ranks over the whole flattened model). Because the merge
  is a mean over the agreeing tasks, not a sum: with ``density=1`` and no sign conflict (and no
  zero deltas) TIES with λ equals ``task_arithmetic`` with λ / T.

  With ``dare_p > 0`` each τ_t is first dropped and rescaled by ``dare`` (DARE + TIES); use
  ``density=1.0`` to let DARE replace the magnitude trim (mergekit's ``dare_ties``).

  Args:
    base: θ_0.
    models: T fine-tuned models of the same structure.
    density: fraction of entries kept per tensor by the trim, in [0, 1] (at least one entry per
      tensor when > 0).
    lam: λ, the scaling of the merged task vector.
    dare_p: DARE drop probability (0: none).
    key: PRNG key for DARE.
  """
  density = _finite(density, "ties: density")  # a float: it is a static (hashed) jit argument
  if not 0.0 <= density <= 1.0:
    raise MergeError(f"ties: density must be in [0, 1], got {density}")
  lam = _finite(lam, "ties: lam (one scalar for the merged task vector)")
  models = _tree_list(models, "models")
  taus = _dare_all(task_vectors(base, models), dare_p, key)

  def merge(j, path, ts):
    return lam * _ties_leaf(ts, density=density)

  return _merge_deltas(base, taus, merge, ["base"] + _names("models", len(models)))


# ------------------------------------------------------------------------------------ SLERP


@functools.partial(jax.jit, static_argnames=("dot_threshold", "eps"))
def slerp_tensor(t: float, v0, v1, *, dot_threshold: float = 0.9995, eps: float = 1e-8):
  """Spherical interpolation of two tensors, each taken as one flat vector (as mergekit does).

      Ω = arccos(<v0/|v0|, v1/|v1|>)
      slerp = sin((1 - t) Ω) / sin Ω · v0 + sin(t Ω) / sin Ω · v1

  The coefficients are applied to the unnormalised tensors; when |cos Ω| > ``dot_threshold``
  (nearly colinear, or anti-colinear) it falls back to (1 - t) v0 + t v1. A tensor with norm
  <= eps is not normalised. t = 0 gives v0, t = 1 gives v1.
  """
  n0, n1 = jnp.linalg.norm(v0.ravel()), jnp.linalg.norm(v1.ravel())
  u0 = jnp.where(n0 > eps, v0 / jnp.where(n0 > eps, n0, 1), v0)
  u1 = jnp.where(n1 > eps, v1 / jnp.where(n1 > eps, n1, 1), v1)
  dot = jnp.sum(u0 * u1)
  lerp = (1 - t) * v0 + t * v1
  colinear = jnp.abs(dot) > dot_threshold
  omega = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
  sin_omega = jnp.where(colinear, 1.0, jnp.sin(omega))
  s0 = jnp.sin((1 - t) * omega) / sin_omega
  s1 = jnp.sin(t * omega) / sin_omega
  return jnp.where(colinear, lerp, s0 * v0 + s1 * v1)


def slerp(a: PyTree, b: PyTree, *, t: float | Callable[[str], float] = 0.5,
          dot_threshold: float = 0.9995, eps: float = 1e-8) -> PyTree:
  """SLERP of two models, tensor by tensor (mergekit's ``slerp``; survey Sec. 7.3).

  Each tensor pair is interpolated along the great circle between them (``slerp_tensor``), with
  linear interpolation where the two are nearly colinear. ``t = 0`` returns ``a``, ``t = 1``
  returns ``b``.

  Args:
    a, b: two models of the same structure (the result has ``a``'s dtypes).
    t: interpolation factor, or a function of the tensor's path (``"layers/3/mlp/up_proj/kernel"``)
      giving a per-tensor factor (mergekit's per-layer / per-filter ``t``).
    dot_threshold: |cos Ω| above which the tensors count as colinear.
    eps: norms at or below it are not normalised.
  """
  t_of = t if callable(t) else (lambda path: t)

  def merge(j, path, xs):
    tj = _finite(t_of(path), f"slerp: t for {path!r}")
    return slerp_tensor(tj, xs[0], xs[1], dot_threshold=dot_threshold, eps=eps)

  return _leafwise(merge, [a, b], ["a", "b"])
