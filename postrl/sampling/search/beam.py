"""Token-level beam search: batched over prompts and beams, one jit-compiled ``lax.while_loop``
over decode steps with the KV cache.

Each prompt is prefilled once; its cache is then copied to W beam rows (row b W + w). At every
step, for each prompt (Graves 2012; Wu et al. 2016, GNMT; the transformers implementation):

    cand[w, v] = S_w + log p(v | beam w)                 S_w: the beam's summed log-prob
    take the 2W best (w, v) over all W x V pairs
    an EOS candidate ranked within the first W becomes a finished hypothesis, scored
        score = S / lp(L),   L = generated length including the EOS token
    the W best non-EOS candidates are the next beams (their cache rows gathered from the parents)

Finished hypotheses are kept aside, the W best per prompt. Length penalty (``length_norm``):

    "hf"    lp(L) = L^α                       (transformers' ``length_penalty``; α = 0: plain sum)
    "gnmt"  lp(L) = ((5 + L) / 6)^α           (Wu et al. 2016, Eq. 14)

A prompt is done when it has W finished hypotheses and no live beam can still beat the worst of
them: a live beam's sum only decreases, so its best reachable score is S / lp(N) for α > 0 (N =
``max_new_tokens``) and S / lp(L) for α <= 0 (transformers' ``early_stopping="never"`` bound);
the loop ends when every prompt is done or after N steps. Live beams then join the finished
hypotheses with their current length (as transformers' ``finalize``), and each prompt's W best
are returned sorted by score.

The per-step log_softmax + add + top-2W over W x V is ``kernels.beam_step.beam_step`` (``impl``:
"pallas" is the fused Triton kernel, "xla" log_softmax + ``lax.top_k``, the same candidates up
to float rounding; "auto" is XLA until the kernel has been measured on a GPU, see
``kernels/README.md``).

Tokens: a prompt's tokens count once (one prefill for all its beams); each step decodes W tokens
for a prompt that is not done, so ``generated = W x steps`` (dead and finished-beam slots
included: the program computes them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.beam_step import IMPLS as BEAM_STEP_IMPLS
from kernels.beam_step import MAX_K as BEAM_STEP_MAX_K
from kernels.beam_step import beam_step
from postrl.models.transformer import KVCache
from postrl import sharding as shd
from postrl.sampling.generate import (_multi_process_mesh, cache_sharding_for, pad_prompts,
                                      place_inputs, row_sharding, to_host)
from postrl.sampling.search.common import (STATUS_NO_ANSWER, STATUS_NO_CANDIDATES, STATUS_OK,
                                           Candidate, SearchError, SearchResult, TokenCount,
                                           as_problems, check_positive, default_extract)

LENGTH_NORMS = ("hf", "gnmt")


class BeamOutput(NamedTuple):
  """``beam_search_ids`` output; per prompt the W hypotheses sorted by score (best first).
  Entries at or beyond ``lengths_BxW`` are ``pad_id``; a score of -inf marks an empty slot."""
  tokens_BxWxN: jax.Array
  lengths_BxW: jax.Array
  scores_BxW: jax.Array    # length-penalised
  logps_BxW: jax.Array     # summed model log-probs S
  finished_BxW: jax.Array  # ended with an EOS token
  steps_B: jax.Array       # decode steps run for the prompt


def length_penalty(length, *, alpha: float, norm: str):
  """lp(L): ``L^α`` ("hf") or ``((5 + L) / 6)^α`` ("gnmt"), as float32."""
  length = jnp.asarray(length, jnp.float32)
  base = length if norm == "hf" else (5.0 + length) / 6.0
  return base ** alpha


def _gather_rows(x, idx_BxK):
  """x [B, W, ...] -> [B, K, ...] rows idx."""
  expand = idx_BxK.reshape(idx_BxK.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, expand, axis=1)


def _merge_top(scores_a, scores_b, arrays_a, arrays_b, k):
  """The k best of two [B, *] candidate sets (set a first on ties) with their arrays."""
  scores = jnp.concatenate([scores_a, scores_b], axis=1)
  top, idx = jax.lax.top_k(scores, k)
  picked = [_gather_rows(jnp.concatenate([a, b], axis=1), idx) for a, b in zip(arrays_a, arrays_b)]
  return top, picked, idx


def _per_prompt(fn, rows):
  """``fn`` run by each device on its own prompts (``shard_map`` over the batch axes of
  ``rows``; every argument and output split on dimension 0). For per-prompt selections whose
  ``top_k`` XLA's partitioner would otherwise run on all-gathered rows; ``rows`` None: ``fn``."""
  if rows is None:
    return fn
  return jax.shard_map(fn, mesh=rows.mesh, in_specs=rows.spec, out_specs=rows.spec,
                       check_vma=False)


def _gather_beams(cache_RxS, parent_BxW):
  """cache rows [B W, ...] -> [B W, ...] with row (b, w) = row (b, parent[b, w]). Gathered per
  prompt (``vmap`` over b: the gather carries the prompts as a batching dimension), so with the
  prompts split over devices each device reorders its own beams and nothing moves."""
  B, W = parent_BxW.shape
  per_prompt = cache_RxS.reshape((B, W) + cache_RxS.shape[1:])
  return jax.vmap(lambda c, p: c[p])(per_prompt, parent_BxW).reshape(cache_RxS.shape)


@functools.partial(jax.jit, static_argnames=("graphdef", "width", "max_new_tokens", "eos_ids",
                                             "pad_id", "alpha", "norm", "impl", "interpret",
                                             "rows", "cache_sharding"))
def _beam_search(graphdef, params, prompt_BxP, lengths_B, *, width, max_new_tokens, eos_ids,
                 pad_id, alpha, norm, impl, interpret, rows=None, cache_sharding=None):
  model = nnx.merge(graphdef, params)
  B, P = prompt_BxP.shape
  W, N = width, max_new_tokens
  # rows: a NamedSharding of dimension 0 (``generate.row_sharding``): every per-prompt array and
  # the [B W, ...] cache stay split over the mesh's batch axes (a prompt's W beams on one device),
  # so each device searches its own prompts; None = every device runs every prompt.
  split = (lambda tree: jax.lax.with_sharding_constraint(tree, rows)) if rows else (lambda t: t)
  split_cache = ((lambda c: jax.lax.with_sharding_constraint(c, cache_sharding))
                 if cache_sharding else split)
  cache = KVCache.zeros(model.config, B, P + N)
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  logits, cache = model.decode(prompt_BxP, positions, cache)
  last = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  V = last.shape[-1]
  cache = split_cache(jax.tree.map(lambda x: jnp.repeat(x, W, axis=0), cache))
  logits = jnp.broadcast_to(last[:, None], (B, W, V))
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  neg = jnp.float32(-jnp.inf)
  rows_W = jnp.repeat(lengths_B, W)
  lp = functools.partial(length_penalty, alpha=alpha, norm=norm)

  def body(state):
    step, cache, logits, live, fin, done, steps_B = state
    live_tok, live_sum = live
    # cand[w, v] = S_w + log_softmax(logits_w)[v]; its 2W best over W x V (ties: smaller w V + v)
    top_val, parent, token, _ = _per_prompt(
        lambda x, s: tuple(beam_step(x, s, 2 * W, impl=impl, interpret=interpret)), rows)(
            logits, live_sum)
    is_eos = jnp.isin(token, eos)
    seqs = _gather_rows(live_tok, parent).at[:, :, step].set(token)  # [B, 2W, N]
    # finished: EOS candidates within the first W ranks (transformers' rule)
    rank = jnp.arange(2 * W)[None]
    new_fin = is_eos & (rank < W) & jnp.isfinite(top_val)
    new_len = jnp.full((B, 2 * W), step + 1, jnp.int32)
    fin_score, fin_arrays, _ = _per_prompt(functools.partial(_merge_top, k=W), rows)(
        fin[0], jnp.where(new_fin, top_val / lp(step + 1), neg),
        fin[1:], (seqs, top_val, new_len))
    # live: the W best non-EOS candidates
    live_val, sel = _per_prompt(lambda x: jax.lax.top_k(x, W), rows)(
        jnp.where(is_eos, neg, top_val))
    new_tok = jnp.take_along_axis(token, sel, axis=1)
    new_live = (_gather_rows(seqs, sel), live_val)
    cache = jax.tree.map(
        functools.partial(_gather_beams, parent_BxW=jnp.take_along_axis(parent, sel, axis=1)),
        cache)
    logits, cache = model.decode(new_tok.reshape(B * W, 1), (rows_W + step)[:, None], cache)
    new_logits = logits[:, 0].reshape(B, W, V)
    # done: W finished and no live beam can still beat the worst of them
    reach = jnp.where(alpha > 0, lp(N), lp(step + 1))
    bound = jnp.max(live_val, axis=1) / reach
    n_fin = jnp.sum(jnp.isfinite(fin_score), axis=1)
    worst = jnp.min(fin_score, axis=1)
    now_done = ((n_fin == W) & (bound <= worst)) | ~jnp.isfinite(jnp.max(live_val, axis=1))
    keep = lambda old, new: jnp.where(done.reshape((B,) + (1,) * (old.ndim - 1)), old, new)
    live = tuple(keep(o, n) for o, n in zip(live, new_live))
    fin = tuple(keep(o, n) for o, n in zip(fin, (fin_score, *fin_arrays)))
    steps_B = steps_B + (~done).astype(jnp.int32)
    done = done | now_done | (step + 1 >= N)
    return (step + 1, split_cache(cache), *split((new_logits, live, fin, done, steps_B)))

  live = (jnp.full((B, W, N), pad_id, jnp.int32),
          jnp.where(jnp.arange(W)[None] == 0, 0.0, neg) * jnp.ones((B, 1), jnp.float32))
  fin = (jnp.full((B, W), neg), jnp.full((B, W, N), pad_id, jnp.int32), jnp.full((B, W), neg),
         jnp.zeros((B, W), jnp.int32))
  state = (jnp.int32(0), cache, logits, live, fin, jnp.zeros((B,), bool),
           jnp.zeros((B,), jnp.int32))
  state = jax.lax.while_loop(lambda s: (s[0] < N) & ~jnp.all(s[5]), body, state)
  _, _, _, live, fin, _, steps_B = state
  live_len = jnp.broadcast_to(steps_B[:, None], (B, W))
  live_score = jnp.where(jnp.isfinite(live[1]), live[1] / lp(jnp.maximum(live_len, 1)), neg)
  top, (tok, sums, lens), idx = _merge_top(fin[0], live_score, fin[1:], (live[0], live[1],
                                                                         live_len), W)
  return BeamOutput(tok, lens, top, sums, idx < W, steps_B)


def _check_length_penalty(alpha) -> None:
  """SearchError unless α is a finite number (with a NaN α every score is NaN: no hypothesis
  would survive and every prompt would read as "no candidates")."""
  try:
    ok = np.isfinite(float(alpha))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise SearchError(f"length_penalty must be a finite number, got {alpha!r}")


def beam_search_ids(model, prompt_BxP, lengths_B, *, width: int, max_new_tokens: int,
                    eos_ids: Sequence[int] | None = None, pad_id: int = 0,
                    length_penalty: float = 1.0, length_norm: str = "hf", impl: str = "auto",
                    interpret: bool = False, split_rows: bool = True,
                    gather_weights: bool = True) -> BeamOutput:
  """Token-level beam search over a batch of right-padded prompts (module doc).

  With parameters on a device mesh, the B prompts are split over the mesh's batch axes when B is
  a multiple of their size (``generate.row_sharding``: each device searches its prompts' W beams,
  the beams reordered per prompt so nothing moves between devices), after fsdp-sharded weights are
  gathered once (``gather_weights``), as ``generate`` does; the hypotheses are those of a
  one-device run. ``split_rows=False`` keeps every prompt on every device.

  Args:
    model: a ``Transformer`` (anything with ``config`` and ``decode(tokens, positions, cache)``),
      or a ``(graphdef, params)`` pair.
    prompt_BxP, lengths_B: right-padded prompt ids and their lengths (>= 1).
    width: W, beams per prompt (2W <= vocabulary size).
    max_new_tokens: N, decode steps at most.
    eos_ids: tokens that finish a hypothesis (default: the model config's).
    pad_id: written after a hypothesis ends.
    length_penalty: α.
    length_norm: "hf" (L^α) or "gnmt" (((5 + L) / 6)^α).
    impl: the step's top-2W: "auto" | "xla" | "pallas" (``kernels.beam_step``; the kernel needs
      2 x width <= 32).
    interpret: run the Pallas kernel in interpret mode (CPU tests of impl="pallas").
    split_rows, gather_weights: data-parallel search on a mesh (above).
  Returns:
    ``BeamOutput`` with the W best hypotheses of each prompt, sorted by score.
  """
  if isinstance(model, tuple):
    graphdef, params = model
    config = nnx.merge(graphdef, params).config
  else:
    graphdef, params = nnx.split(model)
    config = model.config
  check_positive(width=width, max_new_tokens=max_new_tokens)
  if length_norm not in LENGTH_NORMS:
    raise SearchError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
  _check_length_penalty(length_penalty)
  if 2 * width > config.vocab_size:
    raise SearchError(f"beam width {width} needs 2 x width <= the vocabulary size "
                      f"{config.vocab_size}")
  if impl not in BEAM_STEP_IMPLS:
    raise SearchError(f"impl must be one of {BEAM_STEP_IMPLS}, got {impl!r}")
  if impl == "pallas" and 2 * width > BEAM_STEP_MAX_K:
    raise SearchError(f"impl='pallas': the beam-step kernel keeps at most {BEAM_STEP_MAX_K} "
                      f"candidates, so width <= {BEAM_STEP_MAX_K // 2}; got width {width} "
                      f"(use impl='auto' or 'xla')")
  prompt_BxP = np.asarray(prompt_BxP, np.int32)
  lengths = np.asarray(lengths_B, np.int32)
  if prompt_BxP.ndim != 2 or lengths.shape != prompt_BxP.shape[:1]:
    raise SearchError(f"prompt_BxP must be [B, P] and lengths_B [B]; got {prompt_BxP.shape} and "
                      f"{lengths.shape}")
  if lengths.min() < 1 or lengths.max() > prompt_BxP.shape[1]:
    raise SearchError(f"prompt lengths must be in [1, {prompt_BxP.shape[1]}], got {lengths}")
  eos = tuple(int(e) for e in (config.eos_token_ids if eos_ids is None else eos_ids))
  mesh = _multi_process_mesh(params)
  B, P = prompt_BxP.shape
  rows = row_sharding(params, B) if split_rows else None
  if gather_weights and shd.split_over_batch_axes(params):
    params = shd.gather_over_batch_axes(params)
  prompt_BxP, lengths = place_inputs(mesh, rows, prompt_BxP, lengths)
  return _beam_search(graphdef, params, prompt_BxP, lengths, width=int(width),
                      max_new_tokens=int(max_new_tokens), eos_ids=eos, pad_id=int(pad_id),
                      alpha=float(length_penalty), norm=length_norm, impl=impl,
                      interpret=bool(interpret), rows=rows,
                      cache_sharding=None if rows is None else cache_sharding_for(
                          rows, config, B * int(width), P + int(max_new_tokens)))


def beam_search(policy, problems, *, width: int, length_penalty: float = 1.0,
                length_norm: str = "hf", max_new_tokens: int | None = None,
                extract=default_extract, impl: str = "auto",
                interpret: bool = False) -> list[SearchResult]:
  """Beam search on each problem's chat-templated prompt; the best hypothesis is the answer.

  Prompts run ``policy.batch_size // width`` at a time (all their beams in one compiled call;
  a short last group is padded with copies). The score of a candidate is its length-penalised
  log-probability (module doc); candidates come sorted, best first, with ``info`` holding the
  summed log-prob, the length and whether it ended with EOS.

  Args:
    policy: a ``Policy`` (its sampling settings do not apply: beam search is deterministic).
    problems: prompts or problem objects.
    width: W beams per prompt; W <= ``policy.batch_size`` (the beams of one prompt decode in one
      batch).
    length_penalty, length_norm: α and the penalty form ("hf" or "gnmt").
    max_new_tokens: default: the policy's.
    extract: final answer of a text.
    impl, interpret: the beam step's implementation (``beam_search_ids``).
  """
  check_positive(width=width)
  if width > policy.batch_size:
    raise SearchError(f"beam width {width} is larger than the batch the sampler holds "
                      f"(batch_size={policy.batch_size}): the beams of one prompt decode in one "
                      f"batch; raise batch_size or lower the width")
  problems = as_problems(problems)
  N = max_new_tokens or policy.max_new_tokens
  group = max(1, policy.batch_size // width)
  results = []
  for start in range(0, len(problems), group):
    chunk = problems[start:start + group]
    ids = [policy.prompt_ids(p) for p in chunk]
    padded = ids + [ids[-1]] * (group - len(chunk))
    tokens, lengths = pad_prompts(padded, pad_id=policy.pad_id, multiple=16)
    out = beam_search_ids(policy.model, tokens, lengths, width=width, max_new_tokens=N,
                          eos_ids=policy.eos_ids, pad_id=policy.pad_id,
                          length_penalty=length_penalty, length_norm=length_norm, impl=impl,
                          interpret=interpret)
    out = BeamOutput(*(to_host(x) for x in out))
    for b, problem in enumerate(chunk):
      cands = []
      for w in range(width):
        score = float(out.scores_BxW[b, w])
        if not np.isfinite(score):
          continue
        n = int(out.lengths_BxW[b, w])
        text = policy.tokenizer.decode(out.tokens_BxWxN[b, w, :n])
        cands.append(Candidate(text=text, answer=extract(text), score=score,
                               finished=bool(out.finished_BxW[b, w]),
                               info={"logp": float(out.logps_BxW[b, w]), "length": n}))
      steps = int(out.steps_B[b])
      tokens_spent = TokenCount(prompt=len(ids[b]), generated=width * steps)
      info = {"width": width, "steps": steps, "length_penalty": length_penalty,
              "length_norm": length_norm}
      if not cands:
        results.append(SearchResult(problem.prompt, "beam_search", None, None, (), tokens_spent,
                                    STATUS_NO_CANDIDATES, info))
        continue
      best = cands[0]
      status = STATUS_OK if best.answer is not None else STATUS_NO_ANSWER
      results.append(SearchResult(problem.prompt, "beam_search", best.text, best.answer,
                                  tuple(cands), tokens_spent, status, info))
  return results
