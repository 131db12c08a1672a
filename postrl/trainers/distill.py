r"""Knowledge distillation: a smaller student learns a teacher's next-token distributions.

    L(θ) = c * Σ_{b,t} m[b,t] D(p_t, q_θ,t) / Σ_{b,t} m[b,t],   p = teacher, q_θ = student

with D any divergence of ``postrl.losses.distill`` (forward KL, Hinton et al. 2015; reverse KL,
Gu et al. 2024; generalised JSD(β), Agarwal et al. 2024; TVD, Wen et al. 2023; skew KLs, Ko et
al. 2024), each on softmax(z / T) with c = T² (``scale_by_temperature_sq``), or the sparse forward
KL of ``distill_topk`` against the teacher's renormalised top-k. m = 1 on completion tokens only.

The student. ``student_from_teacher`` copies the teacher's embeddings, final norm, output head and
a subset of its layers into a shallower model of the same width (``config.student``), or
``config.student.model`` names a pretrained model sharing the teacher's vocabulary. The default
subset is ``select_layers(30, 15, "spaced")``: evenly spaced layers including the first and the
last one, as in DistilBERT (Sanh et al. 2019: "taking one layer out of two" of the teacher) and
DistilBART's "shrink and fine-tune" (Shleifer & Rush 2020, "Pre-trained Summarization
Distillation": copying maximally spaced layers, first and last kept, beat the alternatives).
Keeping the last layer matters: the final norm and the head were trained on its outputs.
(TinyBERT, Jiao et al. 2020, maps student layer m to teacher layer g(m) = m·L/M the same way,
for its layer-to-layer losses.)

Where the teacher's distribution comes from (``config.loss``):

* ``name="distill"``: on the fly. The teacher is a frozen, sharded, non-donated argument of the
  jitted step (``fit(frozen={"teacher": P})``, the mechanism PEFT's frozen base uses; never a
  closed-over constant, which ``jit`` would embed unsharded); its forward pass runs under
  ``stop_gradient`` inside the loss. It has no optimizer state and is not checkpointed: the
  checkpoint holds the student, and the teacher's digest joins the fingerprint, so a run resumes
  only against the same teacher.
* ``name="distill_topk"``: the teacher's top-k (ids, log-probs) of every completion token are
  computed once over the training records and stored as numpy in ``workdir/teacher_topk/``,
  keyed by a hash of the teacher's weights, the records, ``seq_len`` and k (a resumed or repeated
  run reuses the file). Batches look each packed sequence up by its token content (a sequence's
  teacher outputs do not depend on what it is packed with: attention and positions are per
  segment). ``loss.topk_cache=False`` computes the top-k per batch instead.

On-policy (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes"): with probability λ = ``loss.lmbda`` (a seeded coin per step) the
completions of the batch's prompts are sampled from the current student
(``postrl.sampling.generate``, ``loss.sample_temperature``) and the teacher scores every sampled
token; otherwise the dataset's completions are used. λ = 0 is supervised KD, λ = 1 fully
on-policy. ``DistillBatches.next_batch(params, step)`` is what ``fit`` calls.

Memory and compute. The divergences need both full distributions, so the vocabulary cannot be
chunked with an online log-sum-exp as in ``postrl.logprobs``. Two things keep the [B, T, V]
logits (16 x 128 x 49152 float32 = 400 MB, for each model) from ever existing:

* ``config.loss_positions = P``: both models run over all T positions, but the output
  projections and the divergence only over each row's first P loss positions (gathered in
  order; ``gather_positions``). Completion tokens are ~19% of the arithmetic rows (<= 24 of 128),
  so P = 32 cuts the projection FLOPs (2 D V a position and model, forward, recomputation and
  backward) four-fold. Every dataset batch is checked on the host (a row with more loss tokens is
  an error naming the key, never a silent truncation); sampled batches are packed within P.
* ``config.logprob_chunk = C``: those P positions go C at a time (``lax.map`` over blocks, each
  under ``jax.checkpoint``), so the largest blocks alive are [B, C, V] per model, forward and
  backward: 16 x 16 x 49152 float32 = 50 MB.

PEFT (``config.peft``, ``postrl.peft``): the student gets the adapters and only they are trained;
the teacher is never adapted (it is loaded without ``config.peft``). The frozen tree is then
``{"student": student base, "teacher": P}`` (checkpoints hold the student's adapters and their
Adam moments only). Everything that uses the student (the loss, on-policy sampling, evaluation)
gets ``combine(trainable, frozen)``; the export is the student's adapters and, with
``save_model``, the merged student (``common.save_peft``).

Metrics: ``loss``, ``distill/<divergence>`` (at T, without T²), ``distill/kl_forward`` (KL(p‖q)
at T = 1 for every divergence, so runs compare; against the renormalised top-k for
``distill_topk``), ``distill/top1_agreement`` or ``distill/teacher_topk_mass``, ``distill/nll``
(the student's NLL of the trained tokens) and ``distill/onpolicy_fraction`` (1 on on-policy
steps). Evaluation: the student's greedy exact-match accuracy before and after, the token-level
KL(teacher‖student), top-1 agreement and NLL on the held-out problems' reference completions,
and the teacher's accuracy once for reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from postrl import peft
from postrl import sharding as shd
from postrl.data.pipeline import sft_batches
from postrl.data.records import DataError
from postrl.data.tasks import sft_records
from postrl.logprobs import model_apply_fn
from postrl.losses import aggregate, distill_per_token, distill_topk_per_token
from postrl.losses._distill import DIVERGENCES, TOPK_DIVERGENCES
from postrl.models import ConfigError, Transformer, load_pretrained
from postrl.sampling.generate import generate, pad_prompts, to_host
from postrl.trainers import common
from postrl.trainers.loop import fit
from postrl.trainers.sft import training_records
from postrl.trainers.step import learning_rate_schedule, make_optimizer

LOSSES = ("distill", "distill_topk")
LAYER_SELECTIONS = ("spaced", "first", "last")


# ------------------------------------------------------------------------ student initialisation

def select_layers(num_teacher_layers: int, num_student_layers: int,
                  how: str = "spaced") -> list[int]:
  """Which teacher layers a student of ``num_student_layers`` layers starts from.

      spaced  round(i (L - 1) / (M - 1)), i = 0..M-1: evenly spaced, first and last kept
              (DistilBERT's one-in-two, Sanh et al. 2019; Shleifer & Rush 2020's maximal spacing)
      first   0..M-1 (the bottom of the stack)
      last    L-M..L-1 (the top of the stack)
  """
  L, M = num_teacher_layers, num_student_layers
  if not 1 <= M <= L:
    raise ConfigError(f"config.student.num_layers: need 1 <= num_layers <= {L} (the teacher's "
                      f"layers), got {M}")
  if how == "spaced":
    return [0] if M == 1 else [int(round(i * (L - 1) / (M - 1))) for i in range(M)]
  if how == "first":
    return list(range(M))
  if how == "last":
    return list(range(L - M, L))
  raise ConfigError(f"config.student.select: unknown {how!r}; expected one of {LAYER_SELECTIONS}")


def student_from_teacher(teacher_params, teacher_cfg, layers: Sequence[int]):
  """(student_cfg, student_params): the teacher's embeddings, final norm, output head and
  ``layers`` (teacher indices, strictly increasing) as a ``len(layers)``-layer model.

  Student layer i is a copy of teacher layer ``layers[i]``; nothing is shared with the teacher's
  arrays. ``teacher_params`` is the ``nnx.State`` of a ``Transformer`` (``nnx.split``); the result
  has the structure of ``nnx.split(Transformer(student_cfg))[1]``.
  """
  layers = [int(l) for l in layers]
  L = teacher_cfg.num_hidden_layers
  if not layers:
    raise ConfigError("config.student.layers: the student needs at least one layer")
  if any(not 0 <= l < L for l in layers):
    raise ConfigError(f"config.student.layers: {layers} has an index outside the teacher's "
                      f"{L} layers [0, {L})")
  if any(b <= a for a, b in zip(layers, layers[1:])):
    raise ConfigError(f"config.student.layers: {layers} must be strictly increasing")
  copy = lambda v: v.replace(np.array(v.get_value()))
  flat = {}
  for path, var in teacher_params.flat_state():
    if path[0] != "layers":
      flat[path] = copy(var)
    elif path[1] in layers:
      flat[("layers", layers.index(path[1])) + tuple(path[2:])] = copy(var)
  student_cfg = teacher_cfg.replace(num_hidden_layers=len(layers))
  return student_cfg, nnx.State.from_flat_path(flat)


def graphdef_of(cfg):
  """The NNX graphdef of ``Transformer(cfg)`` (built abstractly: no arrays are allocated)."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]


# ------------------------------------------------------------------------------ the loss

@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """The loss's hyper-parameters, from ``config.loss`` (see ``settings``)."""
  name: str = "distill"
  divergence: str = "forward_kl"
  beta: float = 0.5
  skew: float = 0.1
  temperature: float = 1.0
  scale_by_temperature_sq: bool = True
  topk: int = 64
  hard_label_weight: float = 0.0

  @property
  def sparse(self) -> bool:
    return self.name == "distill_topk"


def settings(loss_cfg) -> DistillSettings:
  """``config.loss`` -> ``DistillSettings``; a bad value is a ``ConfigError`` naming the key."""
  s = DistillSettings(name=loss_cfg.name, divergence=loss_cfg.divergence, beta=loss_cfg.beta,
                      skew=loss_cfg.skew, temperature=loss_cfg.temperature,
                      scale_by_temperature_sq=loss_cfg.scale_by_temperature_sq,
                      topk=loss_cfg.topk, hard_label_weight=loss_cfg.hard_label_weight)
  if s.name not in LOSSES:
    raise ConfigError(f"config.loss.name: unknown {s.name!r}; expected one of {LOSSES}")
  allowed = TOPK_DIVERGENCES if s.sparse else DIVERGENCES
  if s.divergence not in allowed:
    raise ConfigError(f"config.loss.divergence: {s.divergence!r} is not available with "
                      f"config.loss.name={s.name!r}; expected one of {allowed}")
  if s.divergence == "jsd" and not 0.0 < s.beta < 1.0:
    raise ConfigError(f"config.loss.beta: jsd needs 0 < beta < 1, got {s.beta}")
  if s.divergence.startswith("skew_") and not 0.0 <= s.skew < 1.0:
    raise ConfigError(f"config.loss.skew: need 0 <= skew < 1, got {s.skew}")
  if not s.temperature > 0:
    raise ConfigError(f"config.loss.temperature: must be > 0, got {s.temperature}")
  if s.hard_label_weight < 0:
    raise ConfigError(f"config.loss.hard_label_weight: must be >= 0, got {s.hard_label_weight}")
  if s.sparse and s.topk < 1:
    raise ConfigError(f"config.loss.topk: must be >= 1, got {s.topk}")
  if not 0.0 <= loss_cfg.lmbda <= 1.0:
    raise ConfigError(f"config.loss.lmbda: a probability in [0, 1], got {loss_cfg.lmbda}")
  if loss_cfg.lmbda > 0 and min(loss_cfg.max_new_tokens, loss_cfg.sample_batch_size) < 1:
    raise ConfigError("config.loss.max_new_tokens and config.loss.sample_batch_size must be >= 1 "
                      "for on-policy batches (lmbda > 0)")
  return s


def check_config(config) -> DistillSettings:
  """Validates what ``run`` needs before loading anything; returns the loss settings."""
  s = settings(config.loss)
  positions = config.get("loss_positions") or 0
  if positions < 0:
    raise ConfigError(f"config.loss_positions: must be >= 0 (0: all positions), got {positions}")
  if positions and config.loss.lmbda > 0 and positions < config.loss.max_new_tokens:
    raise ConfigError(f"config.loss_positions={positions} is below config.loss.max_new_tokens="
                      f"{config.loss.max_new_tokens}: a sampled completion might not fit a row")
  if not config.student.model and not config.student.layers and config.student.num_layers < 1:
    raise ConfigError("config.student.num_layers: must be >= 1")
  if config.get("peft") is not None:
    peft.check_config(config.peft)
  return s


def without_peft(config) -> ml_collections.ConfigDict:
  """``config`` without its ``peft`` section: what the teacher is loaded with (never adapted)."""
  out = ml_collections.ConfigDict(config.to_dict())
  if "peft" in out:
    del out["peft"]
  return out


def peft_student(config, graphdef, params):
  """(graphdef, trainable, frozen) of the student with ``config.peft`` applied (host arrays);
  (graphdef, params, None) without PEFT."""
  if config.get("peft") is None or not peft.enabled(config.peft):
    return graphdef, params, None
  module = peft.apply_peft(nnx.merge(graphdef, params), config.peft)
  graphdef, trainable, frozen = peft.split_trainable(module)
  if jax.process_index() == 0:
    print(f"peft {config.peft.method} on the student: {peft.num_elements(trainable):,} trainable "
          f"of {peft.num_elements(trainable) + peft.num_elements(frozen):,} stored elements")
  return graphdef, jax.tree.map(np.asarray, trainable), jax.tree.map(np.asarray, frozen)


def next_token_view(batch: dict):
  """(targets_BxT, valid_BxT): position t predicts ``tokens[t + 1]``; valid where that token is a
  loss token of the same (non-padding) segment. The last position predicts nothing."""
  tokens, seg, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  valid = (mask[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  return targets, jnp.pad(valid, ((0, 0), (0, 1)))


def _next(x_BxTx):
  """Entries aligned with tokens (entry t is about predicting token t) -> aligned with the
  predicting position (t - 1), as ``next_token_view``."""
  return jnp.pad(x_BxTx[:, 1:], ((0, 0), (0, 1)) + ((0, 0),) * (x_BxTx.ndim - 2))


def _logits(h_BxCxD, w_DxV):
  return jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV.astype(h_BxCxD.dtype),
                    preferred_element_type=jnp.float32)


def _student_nll(zs_BxCxV, targets_BxC):
  logq = jax.nn.log_softmax(zs_BxCxV, axis=-1)
  return -jnp.take_along_axis(logq, targets_BxC[..., None], axis=-1)[..., 0]


def dense_token_stats(zs_BxCxV, zt_BxCxV, targets_BxC, valid_BxC, s: DistillSettings) -> dict:
  """Per-token ``div`` (the loss's divergence at T), ``kl`` (KL(p‖q) at T = 1), ``agree``
  (argmax agreement) and ``nll`` (-log q(target) at T = 1); ``div`` and ``nll`` carry
  gradients. Positions with valid 0 are zeroed before any arithmetic (as
  ``postrl.losses.distill`` does)."""
  v = valid_BxC[..., None]
  zs = jnp.where(v, zs_BxCxV, 0.0)
  zt = jnp.where(v, zt_BxCxV, 0.0)
  div = distill_per_token(zs, zt, divergence=s.divergence, beta=s.beta, skew=s.skew,
                          temperature=s.temperature)
  if s.divergence == "forward_kl" and s.temperature == 1.0:
    kl = div
  else:
    kl = distill_per_token(zs, zt, divergence="forward_kl", temperature=1.0)
  agree = (jnp.argmax(zs, -1) == jnp.argmax(zt, -1)).astype(jnp.float32)
  sg = jax.lax.stop_gradient
  return dict(div=div, kl=sg(kl), agree=sg(agree), nll=_student_nll(zs, targets_BxC))


def topk_token_stats(zs_BxCxV, ids_BxCxK, logps_BxCxK, targets_BxC, valid_BxC,
                     s: DistillSettings) -> dict:
  """``dense_token_stats`` against the teacher's stored top-k (``distill_topk_per_token``):
  ``div``, ``kl`` (T = 1, renormalised top-k), ``mass`` (Σ_k p_k) and ``nll``."""
  v = valid_BxC[..., None]
  zs = jnp.where(v, zs_BxCxV, 0.0)
  ids = jnp.where(v, ids_BxCxK, 0)
  logps = jnp.where(v, logps_BxCxK, 0.0)
  div = distill_topk_per_token(zs, ids, logps, temperature=s.temperature)
  kl = div if s.temperature == 1.0 else distill_topk_per_token(zs, ids, logps, temperature=1.0)
  mass = jnp.sum(jnp.exp(logps.astype(jnp.float32)), axis=-1)
  sg = jax.lax.stop_gradient
  return dict(div=div, kl=sg(kl), mass=sg(mass), nll=_student_nll(zs, targets_BxC))


def map_positions(fn: Callable[[Any], dict], xs, chunk: int | None) -> dict:
  """``fn`` over blocks of ``chunk`` positions of every [B, T, ...] array in ``xs`` -> dict of
  [B, T, ...] arrays; each block under ``jax.checkpoint`` (recomputed in the backward pass), so only
  one block's [B, chunk, V] logits are alive at a time. ``chunk=None``: one block."""
  T = jax.tree.leaves(xs)[0].shape[1]
  if chunk is None or chunk >= T:
    return fn(xs)
  n = -(-T // chunk)

  def split(x):
    x = jnp.pad(x, ((0, 0), (0, n * chunk - T)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(x.shape[0], n, chunk, *x.shape[2:]).swapaxes(0, 1)

  out = jax.lax.map(jax.checkpoint(fn), jax.tree.map(split, xs))
  return jax.tree.map(
      lambda y: y.swapaxes(0, 1).reshape(y.shape[1], n * chunk, *y.shape[3:])[:, :T], out)


def loss_positions_per_row(batch: dict) -> np.ndarray:
  """[B] number of positions of each row of a host batch that the loss uses (``next_token_view``
  in numpy)."""
  seg, mask = batch["segment_ids"], batch["loss_mask"]
  valid = (mask[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  return valid.sum(axis=1)


def gather_positions(xs, valid_BxT, positions: int | None):
  """Keeps, in every row, its first ``positions`` loss positions (in order; padded with invalid
  ones): each [B, T, ...] array of ``xs`` becomes [B, positions, ...], and ``valid`` with them.
  ``None`` keeps all T. Rows with more loss positions would lose some: ``DistillBatches`` checks
  every batch on the host first (``loss_positions_per_row``)."""
  if positions is None or positions >= valid_BxT.shape[1]:
    return xs, valid_BxT
  order = jnp.argsort(~valid_BxT, axis=1, stable=True)[:, :positions]
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  return jax.tree.map(take, xs), take(valid_BxT)


def distill_loss_fn(student_apply, teacher_apply, s: DistillSettings, *,
                    chunk: int | None = None, positions: int | None = None):
  """``loss_fn(params, batch)`` for ``fit``; see the module docstring.

  ``params``: ``{"student": ..., "teacher": ...}`` (dense) or ``{"student": ...}`` (top-k).
  ``batch``: int32 ``tokens``, ``segment_ids``, ``loss_mask`` [B, T] and, for top-k,
  ``topk_ids`` int32 / ``topk_logps`` float32 [B, T, K] aligned with the tokens (entry t: the
  teacher's top-k for predicting token t). ``loss_weight`` = the number of loss tokens.
  Both models run over all T positions; the output projections and the divergence only over
  the first ``positions`` loss positions of each row (``gather_positions``; None: all T), in
  blocks of ``chunk`` positions (``map_positions``).

  With ``s.hard_label_weight = w > 0`` the loss adds w times the student's NLL of the batch's
  own tokens on the rows marked in ``batch["dataset_rows"]`` (1 = dataset completion, 0 = the
  student's sample; default all 1), divided by all loss tokens so that it stays a mean over the
  same units (Hinton et al. 2015's weighted sum of soft and hard targets; 0 = pure KD).
  """

  def loss_fn(params, batch):
    targets, valid = next_token_view(batch)
    h_s, w_s = student_apply(params["student"], batch["tokens"], batch["segment_ids"])
    if s.sparse:
      xs, valid = gather_positions(
          (h_s, _next(batch["topk_ids"]), _next(batch["topk_logps"]), targets), valid, positions)
      stats = map_positions(lambda a: topk_token_stats(
          _logits(a[0][0], w_s), a[0][1], a[0][2], a[0][3], a[1], s), (xs, valid), chunk)
    else:
      teacher = jax.lax.stop_gradient(params["teacher"])
      h_t, w_t = jax.lax.stop_gradient(
          teacher_apply(teacher, batch["tokens"], batch["segment_ids"]))
      xs, valid = gather_positions((h_s, h_t, targets), valid, positions)
      stats = map_positions(lambda a: dense_token_stats(
          _logits(a[0][0], w_s), _logits(a[0][1], w_t), a[0][2], a[1], s), (xs, valid), chunk)
    mean = lambda x: aggregate(x, valid)
    sg = jax.lax.stop_gradient
    div = mean(stats["div"])
    scale = s.temperature ** 2 if s.scale_by_temperature_sq else 1.0
    loss = scale * div
    metrics = {f"distill/{s.divergence}": sg(div), "distill/kl_forward": mean(stats["kl"]),
               "distill/nll": sg(mean(stats["nll"])),
               "loss_weight": valid.sum().astype(jnp.float32)}
    if s.hard_label_weight:  # Hinton et al.'s hard-label term, on dataset rows only
      rows = batch.get("dataset_rows", jnp.ones(valid.shape[:1], jnp.int32))
      hard = aggregate(stats["nll"] * (rows[:, None] > 0), valid)
      loss = loss + s.hard_label_weight * hard
      metrics["distill/hard_label_nll"] = sg(hard)
    if s.sparse:
      metrics["distill/teacher_topk_mass"] = mean(stats["mass"])
    else:
      metrics["distill/top1_agreement"] = mean(stats["agree"])
    return loss, metrics

  return loss_fn


# ---------------------------------------------------------------------------- teacher top-k

def teacher_topk_fn(graphdef, params, *, mesh, k: int, chunk: int | None = None):
  """``f(global host batch) -> (ids int32, logps float32)`` [B, T, K] numpy, aligned with the
  tokens: entry t holds the teacher's k most likely tokens (and their log-probs at T = 1) for
  position t given tokens[<t] of its segment (entry 0 is zeros; a segment's first token and
  padding hold meaningless values the loss masks). ``params`` are the teacher's device (sharded)
  parameters; every process gets the whole result."""
  apply_fn = model_apply_fn(graphdef)

  @jax.jit
  def compute(params, tokens, segment_ids):
    h, w = apply_fn(params, tokens, segment_ids)

    def block(h_BxCxD):
      logps = jax.nn.log_softmax(_logits(h_BxCxD, w), axis=-1)
      top, ids = jax.lax.top_k(logps, k)
      return dict(ids=ids.astype(jnp.int32), logps=top)

    out = map_positions(lambda a: block(a[0]), (h,), chunk) if chunk else block(h)
    # predictions made at t - 1 belong to token t
    shift = lambda x: jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))
    return shift(out["ids"]), shift(out["logps"])

  def f(batch: dict):
    B = batch["tokens"].shape[0]
    n = B // jax.process_count()
    lo = jax.process_index() * n
    local = {key: batch[key][lo:lo + n] for key in ("tokens", "segment_ids")}
    placed = shd.put_batch(local, mesh)
    ids, logps = compute(params, placed["tokens"], placed["segment_ids"])
    return to_host(ids), to_host(logps)

  return f


def _segments(batch: dict):
  """(row, positions) of every packed sequence (segment id > 0) of a host batch."""
  seg = batch["segment_ids"]
  for b in range(seg.shape[0]):
    for s in np.unique(seg[b]):
      if s > 0:
        yield b, np.flatnonzero(seg[b] == s)


def sequence_key(tokens, loss_mask) -> bytes:
  """Content key of one tokenised sequence (its ids and loss mask)."""
  h = hashlib.blake2b(digest_size=16)
  h.update(np.asarray(tokens, np.int32).tobytes())
  h.update(np.asarray(loss_mask, np.int8).tobytes())
  return h.digest()


class TopKCache:
  """The teacher's top-k at the loss tokens of every training sequence, looked up by content.

  Arrays: ``keys`` [S] (``sequence_key``), ``offsets`` [S + 1], ``ids`` int32 / ``logps``
  float32 [M, K] (M = loss tokens in all), sequence i's rows ``offsets[i]:offsets[i + 1]`` in
  the order of its loss tokens.
  """

  def __init__(self, keys, offsets, ids, logps):
    self.keys, self.offsets, self.ids, self.logps = keys, offsets, ids, logps
    self._index = {bytes(key): i for i, key in enumerate(keys)}

  @classmethod
  def build(cls, batches, topk: Callable[[dict], tuple]) -> "TopKCache":
    """Runs ``topk`` (``teacher_topk_fn``) over every batch of ``batches`` (global host
    batches covering the data once) and keeps each distinct sequence's loss-token rows."""
    keys, offsets, ids, logps, seen, total = [], [0], [], [], set(), 0
    for batch in batches:
      if not batch["segment_ids"].any():
        continue
      b_ids, b_logps = topk(batch)
      for b, pos in _segments(batch):
        mask = batch["loss_mask"][b, pos]
        key = sequence_key(batch["tokens"][b, pos], mask)
        if key in seen:
          continue
        seen.add(key)
        at = pos[mask > 0]
        keys.append(key)
        ids.append(b_ids[b, at])
        logps.append(b_logps[b, at])
        total += len(at)
        offsets.append(total)
    K = ids[0].shape[-1] if ids else 0
    return cls(np.array(keys, dtype="S16"), np.asarray(offsets, np.int64),
               np.concatenate(ids) if ids else np.zeros((0, K), np.int32),
               np.concatenate(logps) if logps else np.zeros((0, K), np.float32))

  def save(self, path: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, keys=self.keys, offsets=self.offsets, ids=self.ids, logps=self.logps)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "TopKCache":
    with np.load(path) as f:
      return cls(f["keys"], f["offsets"], f["ids"], f["logps"])

  def __len__(self) -> int:
    return len(self.keys)

  def attach(self, batch: dict) -> dict:
    """``batch`` plus ``topk_ids`` / ``topk_logps`` [B, T, K] (zeros off the loss tokens)."""
    B, T = batch["tokens"].shape
    K = self.ids.shape[-1]
    ids = np.zeros((B, T, K), np.int32)
    logps = np.zeros((B, T, K), np.float32)
    for b, pos in _segments(batch):
      mask = batch["loss_mask"][b, pos]
      i = self._index.get(sequence_key(batch["tokens"][b, pos], mask))
      if i is None:
        raise DataError("a training sequence is not in the teacher top-k cache (the cache was "
                       "built from other records or another tokenizer); delete "
                       "workdir/teacher_topk and rerun")
      at = pos[mask > 0]
      ids[b, at] = self.ids[self.offsets[i]:self.offsets[i + 1]]
      logps[b, at] = self.logps[self.offsets[i]:self.offsets[i + 1]]
    return dict(batch, topk_ids=ids, topk_logps=logps)


def _digest(*parts) -> str:
  h = hashlib.blake2b(digest_size=16)
  for p in parts:
    h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
  return h.hexdigest()


def params_digest(params) -> bytes:
  """A hash of every parameter's path, dtype, shape and bytes."""
  h = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
    h.update(a.tobytes())
  return h.digest()


def topk_cache(path_dir: str | None, key: str, make_batches: Callable[[], Any],
               topk: Callable[[dict], tuple]) -> TopKCache:
  """The cache ``path_dir/<key>.npz`` if it exists, else built (and saved from process 0)."""
  path = os.path.join(path_dir, f"{key}.npz") if path_dir else None
  if path and os.path.exists(path):
    cache = TopKCache.load(path)
    print(f"teacher top-k: reusing {path} ({len(cache)} sequences)")
    return cache
  t0 = time.perf_counter()
  cache = TopKCache.build(make_batches(), topk)
  print(f"teacher top-k: {len(cache)} sequences, {len(cache.ids)} tokens in "
        f"{time.perf_counter() - t0:.1f}s")
  if path and jax.process_index() == 0:
    os.makedirs(path_dir, exist_ok=True)
    cache.save(path)
    print(f"teacher top-k: wrote {path}")
  return cache


# ------------------------------------------------------------------------------- on-policy

def segment_prompts(batch: dict) -> list[np.ndarray]:
  """The prompt (the tokens before the first loss token) of every packed sequence with a loss
  token, in row order."""
  prompts = []
  for b, pos in _segments(batch):
    mask = batch["loss_mask"][b, pos]
    if mask.any():
      prompts.append(batch["tokens"][b, pos[:int(np.argmax(mask > 0))]])
  return prompts


def pack_sequences(sequences: Sequence[tuple], *, batch_size: int, seq_len: int,
                   pad_id: int = 0, max_loss_tokens: int | None = None) -> tuple[dict, int]:
  """First-fit packing of (ids, loss_mask) pairs into one [batch_size, seq_len] batch.

  Each sequence (cut to ``seq_len``) goes into the first row with room for its tokens and, with
  ``max_loss_tokens``, for its loss tokens (a row then holds at most that many); one that fits
  nowhere is dropped. Returns (batch with ``tokens``, ``segment_ids``, ``loss_mask``, number
  dropped).
  """
  tokens = np.full((batch_size, seq_len), pad_id, np.int32)
  segment_ids = np.zeros((batch_size, seq_len), np.int32)
  loss_mask = np.zeros((batch_size, seq_len), np.int32)
  used = np.zeros(batch_size, np.int64)
  loss_used = np.zeros(batch_size, np.int64)
  count = np.zeros(batch_size, np.int32)
  cap = np.inf if max_loss_tokens is None else max_loss_tokens
  dropped = 0
  for ids, mask in sequences:
    ids, mask = np.asarray(ids)[:seq_len], np.asarray(mask)[:seq_len]
    n_loss = int((mask > 0).sum())
    fits = np.flatnonzero((used + len(ids) <= seq_len) & (loss_used + n_loss <= cap))
    if len(fits) == 0:
      dropped += 1
      continue
    r = fits[0]
    lo, hi = used[r], used[r] + len(ids)
    count[r] += 1
    tokens[r, lo:hi], loss_mask[r, lo:hi], segment_ids[r, lo:hi] = ids, mask, count[r]
    used[r] = hi
    loss_used[r] += n_loss
  return dict(tokens=tokens, segment_ids=segment_ids, loss_mask=loss_mask), dropped


class OnPolicySampler:
  """Replaces a batch's completions by the student's samples (GKD's on-policy batches).

  The prompts of the batch's sequences are generated from in fixed groups of
  ``sample_batch_size`` (padded prompts, one compiled program), with key
  fold_in(seed, step); each sampled completion (through its EOS when one was produced) follows
  its prompt with loss mask 1, and the sequences are packed again (``pack_sequences``, at most
  ``max_loss_tokens`` loss tokens a row).
  """

  def __init__(self, graphdef, *, eos_ids: Sequence[int], pad_id: int, batch_size: int,
               seq_len: int, max_new_tokens: int, temperature: float, sample_batch_size: int,
               seed: int, max_loss_tokens: int | None = None):
    self.graphdef, self.eos_ids, self.pad_id = graphdef, tuple(eos_ids), pad_id
    self.batch_size, self.seq_len = batch_size, seq_len
    self.max_new_tokens, self.temperature = max_new_tokens, temperature
    self.sample_batch_size, self.seed = sample_batch_size, seed
    self.max_loss_tokens = max_loss_tokens

  def __call__(self, student_params, batch: dict, step: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    prompts = segment_prompts(batch)
    G = self.sample_batch_size
    key = jax.random.fold_in(jax.random.key(self.seed), step)
    sequences, lengths, finished = [], [], []
    for start in range(0, len(prompts), G):
      group = prompts[start:start + G]
      padded = list(group) + [group[-1]] * (G - len(group))  # one shape: one compilation
      tokens, lens = pad_prompts(padded, pad_id=self.pad_id, multiple=64)
      out = generate((self.graphdef, student_params), tokens, lens,
                     key=jax.random.fold_in(key, start), max_new_tokens=self.max_new_tokens,
                     temperature=self.temperature, eos_ids=self.eos_ids, pad_id=self.pad_id)
      toks, n, done = to_host(out.tokens_BxN), to_host(out.lengths_B), to_host(out.finished_B)
      for i, prompt in enumerate(group):
        completion = toks[i, :n[i]]
        sequences.append((np.concatenate([prompt, completion]),
                          np.concatenate([np.zeros(len(prompt), np.int32),
                                          np.ones(len(completion), np.int32)])))
        lengths.append(int(n[i]))
        finished.append(bool(done[i]))
    packed, dropped = pack_sequences(sequences, batch_size=self.batch_size, seq_len=self.seq_len,
                                     pad_id=self.pad_id, max_loss_tokens=self.max_loss_tokens)
    metrics = {"distill/sampled_length": float(np.mean(lengths)) if lengths else 0.0,
               "distill/sampled_eos_fraction": float(np.mean(finished)) if finished else 0.0,
               "distill/sampled_dropped": float(dropped),
               "distill/sample_seconds": time.perf_counter() - t0}
    return packed, metrics


def onpolicy_coin(seed: int, step: int, lmbda: float) -> bool:
  """GKD's per-step choice: True (sample from the student) with probability λ; a function of
  (seed, step) only, so a resumed run makes the same choices."""
  if lmbda <= 0.0:
    return False
  if lmbda >= 1.0:
    return True
  return bool(np.random.default_rng([seed, step, 0x6B44]).random() < lmbda)


class DistillBatches:
  """The batch source ``fit`` calls as ``next_batch(params, step)`` (see the module docstring).

  ``offline``: an iterator of *global* SFT batches (``sft_batches(..., shard_count=1)``); it
  advances once per step whatever the coin says, and its position is the checkpointed state.
  ``sampler``: an ``OnPolicySampler`` (needed when λ > 0). ``topk_cache`` / ``topk``: where the
  top-k fields come from in top-k mode (the cache for dataset batches; ``topk`` for sampled
  batches and when there is no cache). ``positions``: the loss's ``positions`` (each dataset
  batch is checked to have at most that many loss positions a row). Each process gets its own
  rows of the global batch.
  """

  def __init__(self, offline, *, lmbda: float = 0.0, seed: int = 0, sampler=None,
               sparse: bool = False, topk_cache: TopKCache | None = None, topk=None,
               positions: int | None = None):
    if lmbda > 0 and sampler is None:
      raise ValueError("on-policy batches (lmbda > 0) need a sampler")
    if sparse and topk is None and (topk_cache is None or lmbda > 0):
      raise ValueError("top-k batches need the teacher's topk function")
    self.offline, self.lmbda, self.seed, self.sampler = offline, lmbda, seed, sampler
    self.sparse, self.cache, self.topk = sparse, topk_cache, topk
    self.positions = positions
    self._metrics: dict = {}

  def next_batch(self, params, step: int) -> dict:
    batch = next(self.offline)
    onpolicy = onpolicy_coin(self.seed, step, self.lmbda)
    if self.positions is not None and not onpolicy:  # sampled batches are packed within it
      most = int(loss_positions_per_row(batch).max())
      if most > self.positions:
        raise ConfigError(f"config.loss_positions={self.positions}, but a row of the batch of "
                          f"step {step} has {most} loss tokens; raise it (0: all positions)")
    metrics = {"distill/onpolicy_fraction": float(onpolicy)}
    if onpolicy:
      batch, sample_metrics = self.sampler(params["student"], batch, step)
      metrics.update(sample_metrics)
    rows = batch["tokens"].shape[0]
    batch = dict(batch, dataset_rows=np.full((rows,), 0 if onpolicy else 1, np.int32))
    if self.sparse:
      if self.cache is not None and not onpolicy:
        batch = self.cache.attach(batch)
      else:
        ids, logps = self.topk(batch)
        batch = dict(batch, topk_ids=ids, topk_logps=logps)
    self._metrics = metrics
    n = batch["tokens"].shape[0] // jax.process_count()
    lo = jax.process_index() * n
    return {k: v[lo:lo + n] for k, v in batch.items()}

  def pop_metrics(self) -> dict:
    out, self._metrics = self._metrics, {}
    return out

  def get_state(self):
    return self.offline.get_state()

  def set_state(self, state) -> None:
    self.offline.set_state(state)


# ------------------------------------------------------------------------------ evaluation

def heldout_fn(student_graphdef, teacher_graphdef, batches: Sequence[dict], *, mesh,
               chunk: int | None = None):
  """``f(student_params, teacher_params) -> {"kl_forward", "kl_reverse", "top1_agreement", "nll",
  "teacher_nll"}``: token means over the loss tokens of ``batches`` (global host batches) of
  KL(p‖q) and KL(q‖p) at T = 1 (p teacher, q student), argmax agreement and both models' NLL of
  the reference tokens."""
  s_apply, t_apply = model_apply_fn(student_graphdef), model_apply_fn(teacher_graphdef)
  s = DistillSettings()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  @jax.jit
  def sums(sp, tp, batch):
    targets, valid = next_token_view(batch)
    h_s, w_s = s_apply(sp, batch["tokens"], batch["segment_ids"])
    h_t, w_t = t_apply(tp, batch["tokens"], batch["segment_ids"])

    def block(a):
      zs, zt = _logits(a[0], w_s), _logits(a[1], w_t)
      out = dense_token_stats(zs, zt, a[2], a[3], s)
      out["teacher_nll"] = _student_nll(zt, a[2])
      v = a[3][..., None]
      out["kl_reverse"] = distill_per_token(jnp.where(v, zs, 0.0), jnp.where(v, zt, 0.0),
                                            divergence="reverse_kl", temperature=1.0)
      del out["div"]
      return out

    stats = map_positions(block, (h_s, h_t, targets, valid), chunk)
    v = valid.astype(jnp.float32)
    out = {k: (x * v).sum() for k, x in stats.items()}
    out["count"] = v.sum()
    return jax.lax.with_sharding_constraint(out, replicated)

  n = batches[0]["tokens"].shape[0] // jax.process_count() if batches else 0
  lo = jax.process_index() * n
  placed = [shd.put_batch({k: b[k][lo:lo + n] for k in ("tokens", "segment_ids", "loss_mask")},
                          mesh) for b in batches]

  def f(student_params, teacher_params):
    total: dict = {}
    for batch in placed:
      for k, x in sums(student_params, teacher_params, batch).items():
        total[k] = total.get(k, 0.0) + float(np.asarray(x.addressable_data(0)))
    count = max(total.pop("count", 0.0), 1.0)
    names = {"kl": "kl_forward", "kl_reverse": "kl_reverse", "agree": "top1_agreement",
             "nll": "nll", "teacher_nll": "teacher_nll"}
    return {names[k]: v / count for k, v in total.items()}

  return f


def teacher_accuracy(teacher_run: common.Run, config, params, workdir: str | None,
                     key: str) -> float:
  """The teacher's greedy exact-match accuracy on the evaluation problems, computed once and
  kept (with every completion) in ``workdir/teacher_eval.json``; a resumed run reads it back."""
  from postrl.evaluate import evaluate_task  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "teacher_eval.json") if workdir else None
  if path and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("key") == key:
      return saved["accuracy"]
  accuracy, records, _ = evaluate_task(
      nnx.merge(teacher_run.graphdef, params), teacher_run.tokenizer, teacher_run.eval_problems,
      batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens,
      temperature=0.0, seed=config.seed, system_prompt=config.get("system_prompt") or None,
      progress=False)
  if path and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(dict(key=key, accuracy=accuracy, records=records), f, indent=1)
    os.replace(path + ".tmp", path)
  return accuracy


# ------------------------------------------------------------------------------------ the job

def make_student(config, teacher_run: common.Run):
  """(student_cfg, graphdef, host params, description) from ``config.student``."""
  st = config.student
  if st.model:
    module = load_pretrained(st.model, **common.model_kwargs(config))
    if module.config.vocab_size != teacher_run.model_cfg.vocab_size:
      raise ConfigError(f"config.student.model: {st.model} has a vocabulary of "
                        f"{module.config.vocab_size}, the teacher {config.teacher} of "
                        f"{teacher_run.model_cfg.vocab_size}; they must share the tokenizer")
    graphdef, params = nnx.split(module)
    return module.config, graphdef, jax.tree.map(np.asarray, params), st.model
  layers = list(st.layers) or select_layers(teacher_run.model_cfg.num_hidden_layers,
                                            st.num_layers, st.select)
  cfg, params = student_from_teacher(teacher_run.params, teacher_run.model_cfg, layers)
  return cfg, graphdef_of(cfg), params, f"{config.teacher} layers {layers}"


def run(config, workdir: str | None) -> dict:
  """Distils ``config.teacher`` into ``config.student`` on ``config.data``; evaluates before and
  after (student accuracy, held-out KL) and the teacher once."""
  s = check_config(config)  # cheap checks first: config, data, then the (slow) model loads
  optim = common.optimizer_config(config)
  records = training_records(config.data, common.eval_problems(config))
  teacher = common.start(without_peft(config), model=config.teacher)  # never adapted
  mesh, tok = teacher.mesh, teacher.tokenizer
  student_cfg, student_graphdef, student_params, description = make_student(config, teacher)
  student_graphdef, student_params, student_frozen = peft_student(config, student_graphdef,
                                                                  student_params)
  print(f"student: {description}: {student_cfg.num_hidden_layers} layers, "
        f"{student_cfg.num_params() / 1e6:.1f}M parameters (teacher "
        f"{teacher.model_cfg.num_params() / 1e6:.1f}M)")
  teacher_dev = shd.put_global(teacher.params, shd.state_shardings(teacher.params, mesh))
  teacher_key = params_digest(teacher.params)
  teacher.params = None  # the host copy is not needed any more
  pad_id = tok.pad_id if tok.pad_id is not None else 0
  chunk = config.get("logprob_chunk")
  positions = config.get("loss_positions") or None

  def global_batches(recs, *, seed, num_epochs=None):
    return sft_batches(recs, tok, batch_size=config.batch_size, seq_len=config.seq_len,
                       pack=config.data.pack, seed=seed, num_epochs=num_epochs, shard_index=0,
                       shard_count=1)

  topk = cache = None
  if s.sparse:
    topk = teacher_topk_fn(teacher.graphdef, teacher_dev, mesh=mesh, k=s.topk, chunk=chunk)
    if config.loss.topk_cache:
      key = _digest(teacher_key, config.seq_len, s.topk, config.data.pack,
                    [r.to_json() for r in records])
      cache = topk_cache(os.path.join(workdir, "teacher_topk") if workdir else None, key,
                         lambda: global_batches(records, seed=config.seed, num_epochs=1), topk)
  sampler = None
  if config.loss.lmbda > 0:
    eos = sorted({e for e in (*student_cfg.eos_token_ids, tok.eos_id) if e is not None})
    sampler = OnPolicySampler(
        student_graphdef, eos_ids=eos, pad_id=pad_id, batch_size=config.batch_size,
        seq_len=config.seq_len, max_new_tokens=config.loss.max_new_tokens,
        temperature=config.loss.sample_temperature,
        sample_batch_size=config.loss.sample_batch_size, seed=config.seed,
        max_loss_tokens=positions)
  batches = DistillBatches(global_batches(records, seed=config.seed), lmbda=config.loss.lmbda,
                           seed=config.seed, sampler=sampler, sparse=s.sparse, topk_cache=cache,
                           topk=topk, positions=positions)

  student_run = dataclasses.replace(
      teacher, graphdef=student_graphdef, params=None, model_cfg=student_cfg, eval_records={},
      frozen=student_frozen, peft=None if student_frozen is None else config.peft)
  extras = {}
  if teacher.eval_problems and config.eval.teacher:
    extras["teacher_accuracy"] = teacher_accuracy(
        teacher, config, teacher_dev, workdir,
        _digest(teacher_key, config.eval.to_dict(), config.data.task.to_dict(),
                config.data.eval_seed, config.get("system_prompt")))
    if jax.process_index() == 0:
      print(f"teacher: exact-match accuracy {extras['teacher_accuracy']:.1%} on "
            f"{len(teacher.eval_problems)} held-out problems")
  held_out = []
  if teacher.eval_problems:
    held_out = list(global_batches(sft_records(teacher.eval_problems), seed=0, num_epochs=1))
  heldout = heldout_fn(student_graphdef, teacher.graphdef, held_out, mesh=mesh, chunk=chunk)
  logged_teacher = []

  def eval_extra(params, step):
    out = heldout(params["student"], params.get("teacher", teacher_dev))
    if "teacher_accuracy" in extras and not logged_teacher:  # once, for reference
      out["teacher_accuracy"] = extras["teacher_accuracy"]
      logged_teacher.append(step)
    return out

  eval_fn = common.task_eval_fn(student_run, config, extra=eval_extra,
                                to_model=lambda p: nnx.merge(student_graphdef, p["student"]))

  params = {"student": student_params}
  tx = make_optimizer(optim)
  frozen = {}  # not trained, not checkpointed: the teacher, and with PEFT the student's base
  if student_frozen is not None:
    frozen["student"] = student_frozen
  if not s.sparse:
    frozen["teacher"] = teacher_dev
    teacher_dev = None  # fit places it as it is (no copy); the eval reads params["teacher"]
  frozen = nnx.State(frozen) if frozen else None
  del student_params
  result = fit(
      distill_loss_fn(model_apply_fn(student_graphdef), model_apply_fn(teacher.graphdef), s,
                      chunk=chunk, positions=positions),
      params, tx, batches, mesh=mesh, total_steps=config.steps, workdir=workdir,
      seed=config.seed, accum_steps=config.accum_steps, save_every=config.checkpoint.every,
      keep_checkpoints=config.checkpoint.keep,
      fingerprint=run_fingerprint(config, student_cfg, teacher.model_cfg),
      log_every=config.log_every, lr_schedule=learning_rate_schedule(optim),
      flops_per_token=common.model_flops(student_cfg, config.seq_len),
      eval_fn=eval_fn if teacher.eval_problems else None, eval_every=config.eval.every,
      eval_before=config.eval.before, frozen=frozen)
  evals = [h for h in result.history if "eval/kl_forward" in h]
  before, after = common.eval_history(result.history, "eval/kl_forward")
  summary_config = ml_collections.ConfigDict(config.to_dict())
  summary_config.model = description  # the trained model, as common.finish reports it
  peft_run = student_frozen is not None
  if peft_run:  # the student's adapters (+ merged student), common.save_peft
    result = dataclasses.replace(result, state=dataclasses.replace(
        result.state, params=result.state.params["student"]))
  return common.finish(
      student_run, summary_config, workdir, result,
      export=None if peft_run else lambda p: (student_graphdef, p["student"]),
      num_train_records=len(records), student=description,
      student_params=student_cfg.num_params(), teacher_params=teacher.model_cfg.num_params(),
      kl_before=None if before is None else before["eval/kl_forward"],
      kl_after=None if after is None else after["eval/kl_forward"],
      num_evals=len(evals), **extras)


def run_fingerprint(config, student_cfg, teacher_cfg) -> dict:
  """What a checkpoint must match to be resumed: both models, the loss, the data stream and the
  optimizer (``steps`` may change, as may logging and evaluation settings)."""
  out = common.fingerprint(config, student_cfg, "batch_size", "accum_steps", "seq_len", "teacher",
                           sections=("data", "optim", "loss", "student", "peft"))
  out["teacher_model"] = common.model_fingerprint(teacher_cfg)
  return out
