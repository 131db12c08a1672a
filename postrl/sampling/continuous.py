"""Continuous batching: Q prompts through B decode slots, a finished row's slot refilled from the
queue inside the same jitted loop.

``generate`` decodes a fixed batch until its longest row ends, so with EOS on, the rows that
stopped early ride along as padding, and a caller with more prompts than fit in one batch waits
for each batch's longest row in turn. ``generate_continuous`` keeps B slots busy instead (the
scheduling of Orca, Yu et al. 2022, and vLLM, Kwon et al. 2023, on a dense per-slot KV cache):

    one loop iteration:
      1. every busy slot samples its next token (EOS or the N-th token frees the slot);
      2. one decode step of all B slots (row b at position len_q + t_b, as in ``generate``);
      3. if the queue holds r > 0 prompts and at least min(R, r) slots are free, prefill the next
         min(R, r, free) prompts ([R, P], one program) into free slots: their keys / values go to
         the slots' cache rows [0, P), their last logits become the slots' next logits.
    The loop ends when the queue is empty and every slot is free. The first B prompts are
    prefilled before the loop as one [B, P] batch.

A refilled slot needs no cache clearing: its cache mask is slot <= position, and a row writes
slot p (prefill or decode) before it attends at position p, so what an earlier prompt left at
slots past the new position is never read. Costs: B slots per decode step whatever their
occupancy, plus an [R, P] prefill per refill (R = ``prefill_rows``: small R refills sooner, large R
prefills fewer times; one refill per iteration, so after many rows end together the slots fill
again over several steps). ``decode_steps`` and ``prefills`` in the output say what a call
spent.

Randomness is per prompt and step: prompt q's t-th token is drawn with
``fold_in(fold_in(key, q), t)``, so with the XLA sampler the tokens do not depend on B, R or the
order slots free up (up to the float rounding of a different batch size), and greedy decoding
equals ``generate``'s. The sampling kernel (``sampling_impl`` "pallas", or "auto" where it picks
the kernel) draws a batch from one key per iteration: the same distribution, a stream that
depends on the schedule. Outputs follow ``generate``'s contract (``GenerateOutput``'s fields,
padding after each row's length). The slots are not split over a mesh: every device decodes
every slot (use ``generate`` for data-parallel decoding).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from postrl.models.transformer import KVCache
from postrl.sampling.generate import (_integer, _prepare_decode, kernel_sample_token,
                                      sample_token)


class ContinuousOutput(NamedTuple):
  """Outputs of ``generate_continuous``: ``generate``'s fields for the Q prompts, plus the work."""
  tokens_BxN: jax.Array
  lengths_B: jax.Array
  logps_BxN: jax.Array
  model_logps_BxN: jax.Array
  finished_B: jax.Array
  decode_steps: jax.Array  # decode steps of all B slots (loop iterations)
  prefills: jax.Array  # prefill programs run, the first [B, P] one included


def _prefill(model, cache: KVCache, tokens_RxP, lengths_R, slots_R):
  """Prefills R prompts into cache rows ``slots_R`` (slots [0, P)); a slot id >= B drops its row.
  Returns (cache, last-position logits [R, V] float32)."""
  R, P = tokens_RxP.shape
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
  h_RxPxD, part = model.hidden_states(tokens_RxP, positions_BxT=positions,
                                      cache=KVCache.zeros(model.config, R, P))
  h_last = jnp.take_along_axis(h_RxPxD, (lengths_R - 1)[:, None, None], axis=1)
  write = lambda full, new: full.at[slots_R, :P].set(new, mode="drop")  # noqa: E731
  cache = KVCache(tuple(map(write, cache.k, part.k)), tuple(map(write, cache.v, part.v)))
  return cache, model.logits(h_last)[:, 0]


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "slots", "prefill_rows", "max_new_tokens", "temperature", "top_k", "top_p",
    "min_p", "eos_ids", "pad_id", "sampling_impl", "interpret", "bits_per_pass"))
def _generate_continuous(graphdef, params, prompt_QxP, lengths_Q, key, *, slots, prefill_rows,
                         max_new_tokens, temperature, top_k, top_p, min_p, eos_ids, pad_id,
                         sampling_impl="xla", interpret=False, bits_per_pass=1):
  model = nnx.merge(graphdef, params)
  Q, P = prompt_QxP.shape
  B, R, N = slots, prefill_rows, max_new_tokens
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  if sampling_impl == "xla":
    def sample(keys_B, logits_BxV, _):  # one key per row: tokens independent of the schedule
      one = lambda k, z: sample_token(k, z[None], bits_per_pass=bits_per_pass,  # noqa: E731
                                      **settings)
      return tuple(x[:, 0] for x in jax.vmap(one)(keys_B, logits_BxV))
  else:
    def sample(_, logits_BxV, iteration):
      return kernel_sample_token(jax.random.fold_in(key, iteration), logits_BxV,
                                 impl=sampling_impl, interpret=interpret, **settings)

  # the first min(B, Q) prompts fill slots 0.. before the loop; a slot holding prompt Q is free
  first = jnp.arange(B)
  slot_q = jnp.where(first < Q, first, Q).astype(jnp.int32)
  cache, logits = _prefill(model, KVCache.zeros(model.config, B, P + N),
                           prompt_QxP[jnp.minimum(first, Q - 1)],
                           lengths_Q[jnp.minimum(first, Q - 1)], jnp.where(first < Q, first, B))
  out = (jnp.full((Q, N), pad_id, jnp.int32), jnp.zeros((Q, N), jnp.float32),
         jnp.zeros((Q, N), jnp.float32))

  def refill(state):
    """Prefills the next min(R, free, queued) prompts into the first free slots."""
    it, cache, logits, slot_q, slot_t, next_q, out, gen_len, finished, prefills = state
    free = slot_q >= Q
    count = jnp.minimum(jnp.minimum(jnp.sum(free), Q - next_q), R)
    k = jnp.arange(R)
    take = k < count
    free_first = jnp.argsort(~free, stable=True)[:R]  # free slots, lowest index first
    slots_R = jnp.where(take, free_first, B)
    q_R = jnp.where(take, next_q + k, Q)
    q_safe = jnp.minimum(q_R, Q - 1)
    cache, new_logits = _prefill(model, cache, prompt_QxP[q_safe], lengths_Q[q_safe], slots_R)
    logits = logits.at[slots_R].set(new_logits, mode="drop")
    slot_q = slot_q.at[slots_R].set(q_R, mode="drop")  # slot_t of a free slot is already 0
    return (it, cache, logits, slot_q, slot_t, next_q + count, out, gen_len, finished,
            prefills + 1)

  def body(state):
    it, cache, logits, slot_q, slot_t, next_q, out, gen_len, finished, prefills = state
    busy = slot_q < Q
    q_safe = jnp.minimum(slot_q, Q - 1)
    keys = jax.vmap(lambda q, t: jax.random.fold_in(jax.random.fold_in(key, q), t))(q_safe,
                                                                                    slot_t)
    token, logp, model_logp = sample(keys, logits, it)
    token = jnp.where(busy, token, pad_id)
    out = (out[0].at[slot_q, slot_t].set(token, mode="drop"),
           out[1].at[slot_q, slot_t].set(logp, mode="drop"),
           out[2].at[slot_q, slot_t].set(model_logp, mode="drop"))
    gen_len = gen_len.at[slot_q].add(1, mode="drop")
    hit_eos = busy & jnp.isin(token, eos)
    finished = finished.at[slot_q].set(hit_eos, mode="drop")
    positions = lengths_Q[q_safe] + slot_t  # slot == position, as in ``generate``
    logits, cache = model.decode(token[:, None], positions[:, None], cache)
    logits = logits[:, 0]
    done = hit_eos | (slot_t + 1 >= N)
    slot_q = jnp.where(busy & done, Q, slot_q)
    slot_t = jnp.where(busy & ~done, slot_t + 1, 0)
    state = (it + 1, cache, logits, slot_q, slot_t, next_q, out, gen_len, finished, prefills)
    queued = Q - next_q
    wanted = (queued > 0) & (jnp.sum(slot_q >= Q) >= jnp.minimum(R, queued))
    return jax.lax.cond(wanted, refill, lambda s: s, state)

  def cond(state):
    slot_q, next_q = state[3], state[5]
    return (next_q < Q) | jnp.any(slot_q < Q)

  state = (jnp.int32(0), cache, logits, slot_q, jnp.zeros((B,), jnp.int32),
           jnp.int32(min(B, Q)), out, jnp.zeros((Q,), jnp.int32), jnp.zeros((Q,), bool),
           jnp.int32(1))
  it, _, _, _, _, _, out, gen_len, finished, prefills = jax.lax.while_loop(cond, body, state)
  return ContinuousOutput(out[0], gen_len, out[1], out[2], finished, it, prefills)


def generate_continuous(model, prompt_QxP, lengths_Q, *, slots: int, prefill_rows: int | None = None,
                        key=None, max_new_tokens: int = 64, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        min_p: float | None = None, eos_ids: Sequence[int] | None = None,
                        pad_id: int = 0, sampling_impl: str = "auto", interpret: bool = False,
                        gather_weights: bool = True) -> ContinuousOutput:
  """Samples continuations of Q right-padded prompts through ``slots`` decode rows, refilling a
  row from the queue as soon as it finishes (module docstring), in one jitted program.

  Args:
    model, prompt_QxP, lengths_Q, key, max_new_tokens, temperature, top_k, top_p, min_p, eos_ids,
      pad_id, sampling_impl, interpret, gather_weights: as ``generate``'s (Q prompts in any
      number; ``sampling_impl`` chooses for ``slots`` rows per step).
    slots: B >= 1, rows decoded per step (the KV cache holds B x (P + N) positions); at most Q
      are used. One slot on one GPU is decoded as two (``min_decode_rows``): two prompts at once.
    prefill_rows: R in [1, B], prompts prefilled per refill, and the free slots a refill waits
      for while the queue holds at least R prompts (default max(1, B // 4)).
  Returns:
    ``ContinuousOutput``: [Q, N] tokens and log-probs, [Q] lengths and finished flags in prompt
    order, the decode steps and prefills spent.
  """
  if _integer(slots) is None or slots < 1:
    raise ValueError(f"generate_continuous: slots must be an integer >= 1 (rows decoded per "
                     f"step), got {slots!r}")
  if prefill_rows is None:
    prefill_rows = max(1, slots // 4)
  if _integer(prefill_rows) is None or not 1 <= prefill_rows <= slots:
    raise ValueError(f"generate_continuous: prefill_rows must be an integer in [1, slots={slots}]"
                     f" (prompts prefilled per refill), got {prefill_rows!r}")
  call = _prepare_decode("generate_continuous", model, prompt_QxP, lengths_Q, key=key,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, min_p=min_p, eos_ids=eos_ids, pad_id=pad_id,
                         sampling_impl=sampling_impl, split_rows=False,
                         gather_weights=gather_weights,
                         rows_per_step=min(int(slots), max(1, len(prompt_QxP))))
  B = max(min(int(slots), int(call.lengths.shape[0])), call.rows_decoded)  # no slot left idle
  return _generate_continuous(call.graphdef, call.params, call.prompt, call.lengths, call.key,
                              slots=B, prefill_rows=min(int(prefill_rows), B),
                              interpret=bool(interpret),
                              **call.settings)
